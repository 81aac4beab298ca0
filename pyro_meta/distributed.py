"""Multi-process meta-training on ``torch.distributed`` (DistributedDataParallel).

Launch with torchrun (one process per GPU, or per CPU core group with ``gloo``)::

    torchrun --nproc_per_node 2 -m pyro_meta train sinusoid --method maml --out runs/ddp
    pyro-meta train sinusoid --method maml --nproc 2 --out runs/ddp        # the same, launched for you

The protocol, as :func:`pyro_meta.train.fit` runs it when a process group is up:

- **Data.** Every rank builds the same seeded task stream and draws the same *global* meta-batch of
  ``T`` tasks, cut into ``S`` contiguous shards as equal as they can be (``micro_batches``, default
  ``S = N``: one per rank; :func:`split`: 25 tasks on 2 ranks are shards of 13 and 12); rank ``r`` of
  ``N`` computes shards ``[r S/N, (r+1) S/N)``, accumulating their gradients. ``S`` must be a multiple
  of ``N`` and at most ``T``.
- **Gradients.** The learner is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`: shard
  ``j``'s loss is the mean over its ``n_j`` tasks times ``N n_j / T`` (:func:`shard_weights`), and DDP
  averages over the ranks, so the update is the one of the mean over all ``T`` tasks, as in one
  process, whether or not ``T`` divides evenly.
- **Noise.** Shard ``j`` of step ``s`` draws its Monte Carlo noise from a torch RNG seeded by
  ``(noise seed, s, j)`` (:func:`shard_seed`), whatever rank computes it. So ``N`` ranks give the same
  parameters as one process with ``micro_batches = S`` (the same global meta-batch, accumulated in
  ``S`` shards) up to float reduction order, for every method, and a checkpoint resumes exactly on any
  number of ranks that divides ``S``. A method that draws no noise in training (MAML) also equals a
  plain single-process run (``S = 1``).
- **Decisions.** Whatever ends or pauses the loop (an interruption seen by any rank, rank 0's clock for
  the time budget and the periodic checkpoint, a non-finite loss on any rank) is agreed by one small
  all-reduce per step, so every rank stops or saves at the same step.
- **Files.** Rank 0 alone writes the checkpoint, ``metrics.jsonl`` and the run directory, and alone shows
  progress; every rank reads the checkpoint on resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """``WORLD_SIZE`` > 1 in the environment (torchrun, or any launcher with its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> Context | None:
    """Join the process group that torchrun describes (``gloo`` on CPU, ``nccl`` on CUDA); ``None`` when
    not launched on several processes. Idempotent."""
    if not launched_by_torchrun():
        return None
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return current()


def launch_device(given: str | None, config_path: Any, resume: bool, default: str = "cpu") -> str:
    """The device a run will use, known before its config is resolved (it picks gloo or nccl): the one
    given, else on resume the run's saved ``config.json``'s, else ``default``."""
    import json
    from pathlib import Path

    if given:
        return given
    path = Path(config_path)
    if resume and path.is_file():
        try:
            return json.loads(path.read_text()).get("device") or default
        except ValueError:
            pass
    return default


def current() -> Context | None:
    """The process group this process is in, if it has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def rank_device(device: str, ctx: Context | None) -> str:
    """``cuda`` becomes ``cuda:<local rank>`` (one GPU per process); CPU is unchanged."""
    if ctx is not None and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


def split(batch: Any, parts: int) -> list[Any]:
    """A global meta-batch (a :class:`~pyro_meta.tasks.TaskBatch`, or anything with ``select`` and
    ``size`` like the VAE's image batches) in ``parts`` contiguous shards as equal as they can be: the
    first ``total % parts`` shards hold one task more (25 in 2: 13 and 12). Weight shard ``j``'s mean loss
    by :func:`shard_weights` to get the mean over the whole meta-batch."""
    total = batch_size(batch)
    if total < parts:
        raise ValueError(f"a meta-batch of {total} cannot be cut into {parts} shards (the ranks times their "
                         f"micro-batches): use a meta-batch of at least {parts}, or fewer processes")
    bounds = shard_bounds(total, parts)
    return [batch.select(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def shard_bounds(total: int, parts: int) -> list[int]:
    """Where :func:`split` cuts ``total`` tasks into ``parts`` shards: ``parts + 1`` offsets."""
    per, extra = divmod(total, parts)
    return [j * per + min(j, extra) for j in range(parts + 1)]


def shard_weights(total: int, parts: int, world: int) -> list[float]:
    """The factor on shard ``j``'s mean loss so that the ranks' accumulated gradients, averaged over the
    ``world`` ranks by DDP, are the gradient of the mean loss over all ``total`` tasks:
    ``world * n_j / total`` (``world / parts`` when the shards are equal)."""
    b = shard_bounds(total, parts)
    return [world * (b[j + 1] - b[j]) / total for j in range(parts)]


def shard_seed(noise_seed: int, step: int, shard: int) -> int:
    """The seed of shard ``shard``'s Monte Carlo noise at step ``step``: a function of the shard, not of
    the rank that computes it, so any number of ranks that divides the shards draws the same noise."""
    return (int(noise_seed) * 1_000_003 + int(step) * 10_007 + int(shard)) % (2**63 - 1)


def batch_size(batch: Any) -> int:
    """Tasks in a meta-batch (``num_tasks``), or ``size`` for a batch that is not one of tasks (images)."""
    n = getattr(batch, "num_tasks", None)
    return n if n is not None else batch.size


def agree(flags: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (one all-reduce)."""
    t = torch.tensor(flags, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    t = value.detach().clone().reshape(1).double()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).reshape(())


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def send_config(payload: Any) -> None:
    """Rank 0: the resolved run the other ranks wait for in :func:`receive_config`."""
    broadcast(("config", payload))


def send_error(e: BaseException) -> None:
    """Rank 0: the run could not start; the other ranks, waiting in :func:`receive_config`, raise it."""
    broadcast(("error", f"{type(e).__name__}: {e}"))


def receive_config() -> Any:
    """A rank other than 0: what rank 0 sent with :func:`send_config`, or a ConfigError for its failure."""
    from .config import ConfigError

    kind, payload = broadcast(None)
    if kind == "error":
        raise ConfigError(f"rank 0 could not start the run: {payload}")
    return payload


def barrier() -> None:
    if current() is not None:
        dist.barrier()
