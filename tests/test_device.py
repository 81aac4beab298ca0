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
from pyro_meta.tasks.stream import BatchCycle, DeviceChunks
from pyro_meta.train import fit
from pyro_meta.vi.vae import ImageStream


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
    assert isinstance(meta, DeviceChunks) and meta.stream.pool.images.device.type == "meta"
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
    assert stream.stream.pool.x_support.device.type == "meta" and next(stream).x_query.device.type == "meta"
    endless = get_benchmark("sinusoid", shots=3, meta_batch=2, num_val_tasks=2, num_test_tasks=2).train
    assert endless.to("cpu") is endless
    on_meta = endless.to("meta")  # drawn on the host, served from the device
    assert {t.device.type for t in (*vars(next(on_meta)).values(),) if isinstance(t, torch.Tensor)} == {"meta"}


def _streams(name: str):
    """Two identical fresh streams of each host-drawn kind."""
    def make():
        if name == "endless":
            return get_benchmark("sinusoid_line", shots=3, meta_batch=2, num_val_tasks=2, num_test_tasks=2).train
        if name == "finite":
            return get_benchmark("sinusoid", shots=3, meta_batch=2, train_tasks=5, num_val_tasks=2,
                                 num_test_tasks=2).train
        if name == "episodes":
            return EpisodeSampler(_pool(), ways=3, shots=1, queries=2, meta_batch=4, seed=5)
        return ImageStream(torch.rand(30, 16, generator=torch.Generator().manual_seed(1)), batch_size=4, seed=3)
    return make(), make()


def _equal(a, b) -> None:
    if isinstance(a, TaskBatch):
        _same_all(a, b)
    else:
        assert torch.equal(a.x, b.x)


def _same_all(a: TaskBatch, b: TaskBatch) -> None:
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.info.keys() == b.info.keys() and all(torch.equal(a.info[k], b.info[k]) for k in a.info)


@pytest.mark.parametrize("kind", ["endless", "finite", "episodes", "images"])
def test_device_chunks_serve_the_host_stream_in_chunks_and_save_its_own_state(kind):
    plain, source = _streams(kind)
    chunked = DeviceChunks(source, "cpu", max_chunk=3)
    states = []
    for _ in range(7):  # across two chunk boundaries
        assert _state_equal(chunked.state_dict(), plain.state_dict())
        states.append(chunked.state_dict())
        _equal(next(chunked), next(plain))
    assert chunked.transfers == 3  # steps 1-3, 4-6, 7
    # a state saved in the middle of a chunk restarts the stream there, chunked or not
    fresh, again = _streams(kind)
    again = DeviceChunks(again, "cpu", max_chunk=3)
    again.load_state_dict(states[4])
    fresh.load_state_dict(states[4])
    for _ in range(4):
        _equal(next(again), next(fresh))


@pytest.mark.parametrize("kind", ["endless", "images"])  # their data stay on the host
def test_device_chunks_moved_back_to_the_host_continue_at_the_next_batch(kind):
    plain, source = _streams(kind)
    chunked = source.to("meta")
    chunked.max_chunk = 4
    for _ in range(2):
        next(chunked)  # drawn 4 ahead on the host, served 2
        next(plain)
    back = chunked.to("cpu")
    assert back is source  # the stream itself, on the host
    for _ in range(3):
        _equal(next(back), next(plain))


def test_fit_leaves_a_chunked_stream_at_the_next_unserved_batch():
    """A second fit on the same stream continues where the first stopped, as on the CPU, although the
    chunked source drew ahead."""
    plain, source = _streams("endless")
    chunked = DeviceChunks(source, "cpu", max_chunk=8)
    fit(build_learner(RunConfig(method="maml", meta_batch=2, shots=3, inner_steps=1)), chunked, 3, progress=False)
    for _ in range(3):
        next(plain)
    _equal(next(source), next(plain))


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def test_device_chunks_size_a_chunk_by_bytes_and_read_no_values_on_the_device():
    images = ImageStream(torch.rand(64, 100), batch_size=8, seed=0).to("meta")
    assert isinstance(images, DeviceChunks)
    images.max_bytes = 3 * 8 * 100 * 4  # three minibatches of float32
    for _ in range(4):
        assert next(images).x.device.type == "meta"
    assert images.transfers == 2 and images.to("meta") is images
    with pytest.raises(ValueError, match="max_chunk"):
        DeviceChunks(images.stream, "cpu", max_chunk=0)


def test_fit_on_chunks_resumes_exactly_like_an_uninterrupted_run(tmp_path):
    def run(out, stop_after=None, resume=False):
        torch.manual_seed(0)
        learner = build_learner(RunConfig(method="maml", meta_batch=2, shots=3, inner_steps=1))
        if resume:
            learner = build_learner(RunConfig(method="maml", meta_batch=2, shots=3, inner_steps=1))
        source = DeviceChunks(get_benchmark("sinusoid", shots=3, meta_batch=2, num_val_tasks=2,
                                            num_test_tasks=2).train, "cpu", max_chunk=4)
        fit(learner, source, 6, out_dir=out, resume=resume, stop_after=stop_after, progress=False,
            checkpoint_every=1)
        return learner

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=3)  # stops in the middle of the first chunk
    resumed = run(tmp_path / "b", resume=True)
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("precision, tf32", [(None, False), ("fp32", False), ("bf16", False), ("tf32", True)])
def test_precision_sets_tensorfloat32_for_matmuls_and_convolutions_both_ways(precision, tf32):
    """fp32 is float32 on a GPU too: PyTorch's default lets cuDNN convolutions use TF32, so fp32 turns it
    off and only tf32 turns it (and TF32 matmuls) on."""
    from pyro_meta.run import apply_precision

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (not tf32), (not tf32)
        apply_precision(RunConfig(precision=precision))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
