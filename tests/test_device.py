"""Task sources keep their data on the training device: fit places the source once, the episode sampler
gathers its meta-batches where its pool lives without reading any value back (checked on PyTorch's
"meta" device, whose tensors have no data: any read would raise), and the regression stream's finite
training set moves once."""

from __future__ import annotations

import pytest
import torch

from pyro_meta import TaskBatch
from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner
from pyro_meta.tasks import Sinusoid, get_benchmark
from pyro_meta.tasks.batch import TaskBatchError
from pyro_meta.tasks.episodes import EpisodeSampler
from pyro_meta.tasks.omniglot import ClassPool
from pyro_meta.tasks.stream import BatchCycle
from pyro_meta.train import fit


def _pool(classes: int = 12, drawings: int = 6, size: int = 8) -> ClassPool:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes, drawings, size, size), generator=g, dtype=torch.uint8)
    return ClassPool(images, [f"a/c{i}" for i in range(classes)])


def _same(a: TaskBatch, b: TaskBatch) -> None:
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.info["classes"], b.info["classes"])


def test_episode_sampler_on_a_device_gathers_there_without_reading_values():
    host = EpisodeSampler(_pool(), ways=3, shots=1, queries=2, meta_batch=4, seed=5)
    meta = EpisodeSampler(_pool(), ways=3, shots=1, queries=2, meta_batch=4, seed=5).to("meta")
    assert meta.pool.images.device.type == "meta"
    for _ in range(3):
        b = next(meta)  # would raise if anything read a value (a finiteness or label check)
        h = next(host)
        assert {t.device.type for t in (b.x_support, b.y_support, b.x_query, b.y_query)} == {"meta"}
        assert (b.x_support.shape, b.x_query.shape, b.y_query.shape) == (h.x_support.shape, h.x_query.shape,
                                                                          h.y_query.shape)
    # the stream is the CPU generator's: the same episodes wherever the pool lives
    moved = EpisodeSampler(_pool(), ways=3, shots=1, queries=2, meta_batch=4, seed=5).to("cpu")
    again = EpisodeSampler(_pool(), ways=3, shots=1, queries=2, meta_batch=4, seed=5)
    for _ in range(2):
        _same(next(moved), next(again))


def test_trusted_batches_skip_the_value_checks_only():
    x, y = torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)
    nan = torch.full((2, 3, 1), float("nan"))
    with pytest.raises(TaskBatchError, match="NaN"):
        TaskBatch(x, y, nan, y)
    assert TaskBatch.trusted(x, y, nan, y).x_query.isnan().all()  # the source vouches for its values
    with pytest.raises(TaskBatchError, match="x_query"):
        TaskBatch.trusted(x, y, torch.zeros(3, 3, 1), y)  # shapes are still checked
    with pytest.raises(TaskBatchError, match="int64"):
        TaskBatch.trusted(x, y.int(), x, y.int())


def test_fit_places_the_task_source_once():
    class Source(BatchCycle):
        def __init__(self, batches):
            super().__init__(batches)
            self.moved = []

        def to(self, device):
            self.moved.append(torch.device(device))
            return super().to(device)

    batches = [Sinusoid().sample(2, 3, 3, torch.Generator().manual_seed(i)) for i in range(2)]
    source = Source(batches)
    learner = build_learner(RunConfig(method="maml", meta_batch=2, shots=3, inner_steps=1))
    fit(learner, source, 3, progress=False)
    assert source.moved == [torch.device("cpu")] and source.position == 3


def test_batch_cycle_moves_its_own_list_and_a_finite_stream_its_pool():
    batches = [Sinusoid().sample(2, 3, 3, torch.Generator().manual_seed(0))]
    cycle = BatchCycle(batches).to("meta")
    assert next(cycle).x_support.device.type == "meta" and batches[0].x_support.device.type == "cpu"
    bm = get_benchmark("sinusoid", shots=3, meta_batch=2, train_tasks=5, num_val_tasks=2, num_test_tasks=2)
    stream = bm.train.to("meta")
    assert stream.pool.x_support.device.type == "meta" and next(stream).x_query.device.type == "meta"
    endless = get_benchmark("sinusoid", shots=3, meta_batch=2, num_val_tasks=2, num_test_tasks=2).train
    assert endless.to("meta") is endless and next(endless).x_support.device.type == "cpu"  # drawn on the host
