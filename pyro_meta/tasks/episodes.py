"""N-way K-shot classification episodes drawn from a :class:`~pyro_meta.tasks.omniglot.ClassPool`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .batch import TaskBatch
from .omniglot import ClassPool
from .regression import ProtocolError
from .stream import DeviceChunks, on_host


def _check(pool: ClassPool, ways: int, shots: int, queries: int, **counts: int) -> None:
    if not isinstance(pool, ClassPool):
        raise ProtocolError(f"expected a ClassPool (see class_pool()), got {type(pool).__name__}")
    for what, v in {"ways": ways, "shots": shots, "queries": queries, **counts}.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ProtocolError(f"{what} must be a positive integer, got {v!r}")
    if ways > pool.num_classes:
        raise ProtocolError(
            f"asked for {ways}-way tasks but the pool has {pool.num_classes} classes"
        )
    if shots + queries > pool.drawings:
        raise ProtocolError(
            f"asked for {shots} shots + {queries} queries = {shots + queries} distinct drawings "
            f"per class, but each class has {pool.drawings} drawings"
        )


def _sample(
    images: Tensor, num_tasks: int, ways: int, shots: int, queries: int, g: torch.Generator
) -> TaskBatch:
    """``num_tasks`` episodes, vectorized over tasks: the draws of :func:`_draw` gathered by
    :func:`_gather`. The batch is on the pool's device."""
    C, D = images.shape[:2]
    return _gather(images, *_draw(num_tasks, C, D, ways, shots + queries, g), shots)


def _draw(num_tasks: int, C: int, D: int, ways: int, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """The classes ``[T, ways]`` and, per class, the drawings ``[T, ways, n]`` of ``num_tasks`` episodes
    from a pool of ``C`` classes of ``D`` drawings, with the CPU generator ``g`` (reproducible everywhere).

    The ``ways`` largest of ``C`` iid uniform keys are a uniformly random set of distinct classes
    in a uniformly random order (that order assigns the labels); the same trick picks
    ``n`` = shots + queries distinct drawings per class. float64 keys make ties (which would make
    the choice depend on the sort implementation) practically impossible.
    """
    classes = torch.rand(num_tasks, C, generator=g, dtype=torch.float64).topk(ways, dim=-1).indices
    drawings = torch.rand(num_tasks, ways, D, generator=g, dtype=torch.float64).topk(n, dim=-1).indices
    return classes, drawings


def _gather(images: Tensor, classes: Tensor, drawings: Tensor, shots: int) -> TaskBatch:
    """The episodes that :func:`_draw` chose, gathered from the pool where it lives."""
    (C, D, S, _), (T, ways, n) = images.shape, drawings.shape
    queries = n - shots
    # One index_select per set on the flattened [C*D, S, S] pool: contiguous, class-major output
    # without the copies that advanced indexing plus slicing would make.
    classes = classes.to(images.device)
    flat_index = classes[:, :, None] * D + drawings.to(images.device)  # T ways n
    flat_pool = images.reshape(C * D, S, S)

    def take(idx: Tensor) -> Tensor:
        x = flat_pool.index_select(0, idx.reshape(-1)).view(T, -1, 1, S, S)
        return x.to(torch.float32).div_(255.0)

    labels = torch.arange(ways, device=images.device)
    # values guaranteed by construction (pixels from uint8, labels 0..ways-1): no check reads them back
    return TaskBatch.trusted(
        take(flat_index[:, :, :shots]),
        labels.repeat_interleave(shots).repeat(T, 1),
        take(flat_index[:, :, shots:]),
        labels.repeat_interleave(queries).repeat(T, 1),
        {"classes": classes},
    )


class EpisodeSampler:
    """An endless, seeded stream of N-way K-shot meta-batches; the interface of
    :class:`~pyro_meta.tasks.registry.TaskStream`.

    Each task draws ``ways`` distinct classes of ``pool`` uniformly at random, labelled
    ``0..ways-1`` in the order drawn, and per class ``shots + queries`` distinct drawings
    (the first ``shots`` are support, the rest query). Each ``next()`` is a :class:`TaskBatch`:

    - ``x_support``: float32 ``[T, ways*shots, 1, S, S]`` in [0, 1] (ink = 1);
      ``y_support``: int64 ``[T, ways*shots]``, class-major (class 0's shots first)
    - ``x_query``: ``[T, ways*queries, 1, S, S]``; ``y_query``: ``[T, ways*queries]``
    - ``info["classes"]``: int64 ``[T, ways]``, the pool index of each label

    Sampling is vectorized over tasks. Measured for a 32-task 20-way 1-shot 15-query meta-batch
    from the 4,112-class Vinyals train pool, one thread on a busy 2-core CPU: the sampling itself
    about 5 ms (median); :class:`TaskBatch`'s finiteness check over the 7.5 M query pixels adds
    20-100 ms on that machine (a 5-way 1-shot 15-query batch: about 6 ms in all).

    :param seed: seed of the sampler's own generator (independent of the global torch RNG).
    :raises ProtocolError: ``ways`` above the pool's classes, ``shots + queries`` above the
        drawings per class, or a count below 1.
    """

    def __init__(
        self, pool: ClassPool, ways: int, shots: int, queries: int, meta_batch: int, seed: int
    ):
        _check(pool, ways, shots, queries, meta_batch=meta_batch)
        self.pool, self.ways, self.shots, self.queries = pool, ways, shots, queries
        self.meta_batch = meta_batch
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> EpisodeSampler:
        return self

    def to(self, device: torch.device | str) -> EpisodeSampler | DeviceChunks:
        """Keep the pool's images on ``device`` (moved once; uint8, 64 MB for the Vinyals train pool) and
        gather every meta-batch there. The class and drawing indices still come from the CPU generator
        (so the stream is the same on every device), drawn for many steps at once and copied in one
        transfer per chunk (:class:`~pyro_meta.tasks.stream.DeviceChunks`), not every step."""
        self.pool = ClassPool(self.pool.images.to(device), self.pool.names)
        return self if on_host(device) else DeviceChunks(self, device)

    def _draw_host(self) -> tuple[Tensor, Tensor]:
        C, D = self.pool.images.shape[:2]
        return _draw(self.meta_batch, C, D, self.ways, self.shots + self.queries, self.generator)

    def _build(self, draws: tuple[Tensor, ...]) -> TaskBatch:
        return _gather(self.pool.images, draws[0], draws[1], self.shots)

    def __next__(self) -> TaskBatch:
        return self._build(self._draw_host())

    def _protocol(self) -> dict[str, int]:
        return {
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "meta_batch": self.meta_batch,
            "num_classes": self.pool.num_classes,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), **self._protocol()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict`; the protocol must be the same."""
        differ = {
            k: (state[k], v) for k, v in self._protocol().items() if k in state and state[k] != v
        }
        if differ:
            what = ", ".join(
                f"{k} saved {a} but this sampler has {b}" for k, (a, b) in differ.items()
            )
            raise ProtocolError(f"cannot continue a different episode stream: {what}")
        self.generator.set_state(state["generator"])


def fixed_episodes(
    pool: ClassPool, num_tasks: int, ways: int, shots: int, queries: int, seed: int
) -> TaskBatch:
    """A fixed evaluation set (e.g. 600 test episodes): the same tasks on every call and machine
    (its own CPU generator seeded with ``seed``). Shapes as :class:`EpisodeSampler` with
    ``T = num_tasks``."""
    _check(pool, ways, shots, queries, num_tasks=num_tasks)
    return _sample(
        pool.images, num_tasks, ways, shots, queries, torch.Generator().manual_seed(seed)
    )


def within_alphabet_episodes(
    pool: ClassPool, num_tasks: int, ways: int, shots: int, queries: int, seed: int
) -> TaskBatch:
    """Lake et al.'s one-shot protocol, generalized to N-way K-shot: fixed episodes whose ``ways`` classes
    all come from one alphabet (an alphabet drawn uniformly among those with at least ``ways`` classes in
    ``pool``; build the pool with ``rotations=(0,)``: no rotated classes), and whose support and query
    images come from different drawers: per episode ``shots + queries`` distinct drawers, the first
    ``shots`` drawing every class's support images, the others its query images (Omniglot's drawing ``d``
    of every character is by drawer ``d + 1``). With ``ways=20, shots=1, queries=1``: Lake's 20-way runs
    (one alphabet, a support drawer and a test drawer). Vectorized over tasks; shapes and labels as
    :func:`fixed_episodes`, ``info["alphabet"]`` the alphabet's index in :func:`alphabets_of`.

    :raises ProtocolError: no alphabet of ``pool`` has ``ways`` classes, or ``shots + queries`` exceeds
        the drawers."""
    _check(pool, ways, shots, queries, num_tasks=num_tasks)
    names, alpha_of = alphabets_of(pool)
    counts = torch.bincount(alpha_of, minlength=len(names))
    eligible = torch.nonzero(counts >= ways).flatten()
    if eligible.numel() == 0:
        raise ProtocolError(f"within-alphabet {ways}-way episodes need an alphabet with {ways} classes; the pool's "
                            f"largest has {int(counts.max())}")
    g = torch.Generator().manual_seed(seed)
    C, D = pool.images.shape[:2]
    pick = torch.randint(eligible.numel(), (num_tasks,), generator=g)
    alphabet = eligible[pick]  # T
    keys = torch.rand(num_tasks, C, generator=g, dtype=torch.float64)
    keys = torch.where(alpha_of[None, :] == alphabet[:, None], keys, torch.full_like(keys, -1.0))
    classes = keys.topk(ways, dim=-1).indices  # T ways, all from the task's alphabet (keys >= 0 first)
    drawers = torch.rand(num_tasks, D, generator=g, dtype=torch.float64).topk(shots + queries, dim=-1).indices
    drawings = drawers[:, None, :].expand(num_tasks, ways, shots + queries)  # the same drawers for every class
    batch = _gather(pool.images, classes, drawings, shots)
    batch.info["alphabet"] = alphabet.to(pool.images.device)
    return batch


def alphabets_of(pool: ClassPool) -> tuple[list[str], Tensor]:
    """The pool's alphabets (sorted names) and each class's alphabet index ``[C]`` (from the class names
    ``"Alphabet/characterNN/rotRRR"``)."""
    per_class = [name.split("/")[0] for name in pool.names]
    names = sorted(set(per_class))
    index = {a: i for i, a in enumerate(names)}
    return names, torch.tensor([index[a] for a in per_class], dtype=torch.long)
