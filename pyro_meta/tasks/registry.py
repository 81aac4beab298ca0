"""Benchmark registry: ``get_benchmark(name, **protocol)`` -> train stream, validation and test tasks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .batch import TaskBatch
from .custom import TaskFamily, custom_family, is_import_path, registered_benchmarks
from .regression import ProtocolError, RegressionFamily, Sinusoid, SinusoidBMAML, SinusoidLine
from .stream import DeviceChunks, on_host


class TaskStream:
    """An endless, seeded stream of training meta-batches whose position can be saved and restored.

    :param family: the task family to draw from.
    :param meta_batch: tasks per meta-batch ``T``.
    :param shots: support points per task; :param queries: query points per task.
    :param seed: seed of the stream's own generator (independent of the global torch RNG).
    :param num_tasks: ``None``: every meta-batch draws fresh tasks (an endless task distribution). An
        integer: a finite training set (BMAML's 100- and 1000-task settings): ``num_tasks`` tasks, their
        functions and their points, drawn once from ``seed``; each meta-batch takes ``meta_batch`` of them
        at random without replacement.
    """

    def __init__(self, family: RegressionFamily | TaskFamily, meta_batch: int, shots: int, queries: int,
                 seed: int, num_tasks: int | None = None):
        if not isinstance(meta_batch, int) or isinstance(meta_batch, bool) or meta_batch < 1:
            raise ProtocolError(f"meta_batch must be a positive integer, got {meta_batch!r}")
        family.check(shots, queries)
        self.family, self.meta_batch, self.shots, self.queries = family, meta_batch, shots, queries
        self.generator = torch.Generator().manual_seed(seed)
        self.num_tasks, self.pool = num_tasks, None
        self._info_keys: tuple[str, ...] = ()
        if num_tasks is not None:
            if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < meta_batch:
                raise ProtocolError(f"a finite training set needs at least meta_batch = {meta_batch} tasks, got "
                                    f"train_tasks={num_tasks!r}")
            self.pool = family.sample(num_tasks, shots, queries, torch.Generator().manual_seed(seed + 7919))

    def __iter__(self):
        return self

    def to(self, device: torch.device | str) -> TaskStream | DeviceChunks:
        """Serve the stream on ``device``. A finite training set moves there once and each meta-batch is
        selected there; an endless stream draws its tasks with its CPU generator as always. Either way
        the host's draws (the tasks' points, or the selected indices) cross in chunks of many steps
        (:class:`~pyro_meta.tasks.stream.DeviceChunks`), not every step, and the meta-batches are the
        same on every device."""
        if self.pool is not None:
            self.pool = self.pool.to(device)
        return self if on_host(device) else DeviceChunks(self, device)

    def _draw_host(self) -> tuple[Tensor, ...]:
        if self.pool is not None:
            return (torch.randperm(self.num_tasks, generator=self.generator)[: self.meta_batch],)
        b = self.family.sample(self.meta_batch, self.shots, self.queries, self.generator)
        self._info_keys = tuple(b.info)
        return (b.x_support, b.y_support, b.x_query, b.y_query, *b.info.values())

    def _build(self, draws: tuple[Tensor, ...]) -> TaskBatch:
        if self.pool is not None:
            return self.pool.select(draws[0])
        # the family's sample checked these values on the host
        return TaskBatch.trusted(*draws[:4], dict(zip(self._info_keys, draws[4:])))

    def __next__(self) -> TaskBatch:
        if self.pool is None:
            return self.family.sample(self.meta_batch, self.shots, self.queries, self.generator)
        return self._build(self._draw_host())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark provides: a training stream and fixed, seeded validation and test tasks."""

    name: str
    train: Any  # an endless iterator of TaskBatch with state_dict/load_state_dict (TaskStream, EpisodeSampler)
    val: TaskBatch
    test: TaskBatch
    family: RegressionFamily | TaskFamily | None  # the task family (regression: plots of the true function)
    protocol: dict[str, Any]
    classification: bool = False
    extra: dict[str, TaskBatch] = field(default_factory=dict)
    """Further fixed test sets reported beside ``test`` (``--split lake``: ``"within_alphabet"``, Lake's
    one-shot protocol)."""

    @property
    def is_classification(self) -> bool:
        return self.classification


def family_of(name: str) -> RegressionFamily | TaskFamily | None:
    """The task family of a regression benchmark, built-in or a user's import path; ``None`` if unknown."""
    return _FAMILIES[name]() if name in _FAMILIES else custom_family(name)


def all_benchmarks() -> dict[str, str]:
    """Name -> description of the built-in benchmarks and those registered in this process."""
    return {**BENCHMARKS, **registered_benchmarks()}


def is_known_benchmark(name: str) -> bool:
    """A built-in, a registered name, or a ``module:attr`` import path."""
    return name in all_benchmarks() or is_import_path(name)


# Seeds of the fixed evaluation sets: part of the benchmark's definition, not of a run.
VAL_SEED = 1_000_003
TEST_SEED = 2_000_003

_FAMILIES = {"sinusoid": Sinusoid, "sinusoid_line": SinusoidLine, "sinusoid_bmaml": SinusoidBMAML}
BENCHMARKS = {
    "sinusoid": "MAML's sinusoid regression: A~U[0.1,5], phase~U[0,pi], x~U[-5,5], noiseless",
    "sinusoid_line": "PLATIPUS's ambiguous tasks: sinusoid or line, noise std 0.3",
    "sinusoid_bmaml": "BMAML's sinusoids: A~U[0.1,5], frequency~U[0.5,2], phase~U[0,2pi], x~U[-5,5], noise std "
                      "0.01 A (noiseless test queries)",
    "omniglot": "N-way K-shot Omniglot, 28x28, rotations as classes; Vinyals split (or Lake's)",
}
CLASSIFICATION_BENCHMARKS = ("omniglot",)
# which classes each part of an Omniglot split uses: train, validation, test
_OMNIGLOT_PARTS = {"vinyals": ("train", "val", "test"), "lake": ("background", "evaluation", "evaluation")}


def get_benchmark(
    name: str,
    shots: int = 5,
    queries: int | None = None,
    meta_batch: int = 25,
    eval_queries: int = 100,
    num_val_tasks: int = 100,
    num_test_tasks: int = 600,
    seed: int = 0,
    ways: int | None = None,
    data_root: str | None = None,
    split: str | None = None,
    train_tasks: int | None = None,
) -> Benchmark:
    """Build a benchmark.

    :param name: one of :data:`BENCHMARKS`, a name registered with
        :func:`~pyro_meta.tasks.register_benchmark`, or the import path ``"module:function"`` of a task
        function (see :mod:`pyro_meta.tasks.custom`).
    :param shots: support points per task (per class for classification), train and evaluation.
    :param queries: query points per training task (per class); default ``shots`` (MAML draws 2K points
        and splits them K/K).
    :param eval_queries: query points per evaluation task (per class).
    :param seed: seed of the training stream; the evaluation sets have fixed seeds of their own.
    :param ways: classes per task (classification).
    :param data_root: where the Omniglot files are (see :func:`pyro_meta.tasks.omniglot.find_omniglot`).
    :param split: ``"vinyals"`` (train / val / test classes, the few-shot standard) or ``"lake"``
        (background for training, evaluation alphabets for validation and test; their val and test
        episodes differ only by seed).
    :param train_tasks: regression: a finite training set of this many tasks (see :class:`TaskStream`);
        ``None`` (default) draws fresh tasks for every meta-batch.
    """
    if name in CLASSIFICATION_BENCHMARKS:
        if train_tasks is not None:
            raise ProtocolError("train_tasks (a finite training set of regression tasks) is not a setting of "
                                f"{name!r}")
        return _omniglot(shots, queries, meta_batch, eval_queries, num_val_tasks, num_test_tasks, seed,
                         ways or 5, data_root, split or "vinyals")
    family = family_of(name)
    if family is None:
        raise ProtocolError(f"unknown benchmark {name!r}; known: {', '.join(sorted(all_benchmarks()))}, or a task "
                            "function's import path 'module:function'")
    queries = shots if queries is None else queries
    train = TaskStream(family, meta_batch, shots, queries, seed, num_tasks=train_tasks)
    val = family.fixed(num_val_tasks, shots, eval_queries, VAL_SEED)
    test = family.fixed(num_test_tasks, shots, eval_queries, TEST_SEED)
    protocol = {
        "benchmark": name,
        "family": _describe_family(family),
        "shots": shots,
        "queries": queries,
        "meta_batch": meta_batch,
        "train_tasks": train_tasks if train_tasks is not None else "endless (fresh tasks every meta-batch)",
        "eval_queries": eval_queries,
        "num_val_tasks": num_val_tasks,
        "num_test_tasks": num_test_tasks,
        "val_seed": VAL_SEED,
        "test_seed": TEST_SEED,
    }
    return Benchmark(name, train, val, test, family, protocol,
                     classification=isinstance(family, TaskFamily) and family.kind == "classification")


def _describe_family(family: RegressionFamily | TaskFamily) -> dict[str, Any]:
    if isinstance(family, TaskFamily):
        fn = family.make_tasks
        where = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        return {"kind": family.kind, "function": where, "description": family.description,
                "x_shape": list(family.probe["x_shape"]), "y_dim": family.probe["y_dim"],
                "ways": family.probe["ways"]}
    return dict(asdict(family))


def _omniglot(shots: int, queries: int | None, meta_batch: int, eval_queries: int, num_val_tasks: int,
              num_test_tasks: int, seed: int, ways: int, data_root: str | None, split: str) -> Benchmark:
    from .episodes import EpisodeSampler, fixed_episodes, within_alphabet_episodes
    from .omniglot import class_pool, load_omniglot

    if split not in _OMNIGLOT_PARTS:
        raise ProtocolError(f"unknown Omniglot split {split!r}; known: {', '.join(_OMNIGLOT_PARTS)}")
    queries = shots if queries is None else queries
    data = load_omniglot(data_root)
    train_part, val_part, test_part = _OMNIGLOT_PARTS[split]
    pools = {part: class_pool(data, split=split, part=part) for part in {train_part, val_part, test_part}}
    train = EpisodeSampler(pools[train_part], ways, shots, queries, meta_batch, seed)
    val = fixed_episodes(pools[val_part], num_val_tasks, ways, shots, eval_queries, VAL_SEED)
    test = fixed_episodes(pools[test_part], num_test_tasks, ways, shots, eval_queries, TEST_SEED)
    extra = {}
    if split == "lake":
        plain = class_pool(data, split=split, part=test_part, rotations=(0,))
        extra["within_alphabet"] = within_alphabet_episodes(plain, num_test_tasks, ways, shots,
                                                            min(eval_queries, plain.drawings - shots), TEST_SEED)
    protocol = {
        "benchmark": "omniglot", "split": split, "ways": ways, "shots": shots,
        "queries_per_class": queries, "meta_batch": meta_batch, "eval_queries_per_class": eval_queries,
        "num_val_tasks": num_val_tasks, "num_test_tasks": num_test_tasks, "val_seed": VAL_SEED,
        "test_seed": TEST_SEED, "image_size": 28, "rotations_as_classes": [0, 90, 180, 270],
        "classes": {part: pool.num_classes for part, pool in pools.items()},
        "parts": {"train": train_part, "val": val_part, "test": test_part},
        "preprocessing": "inverted (ink = 1), resized 105 -> 28 with antialiasing, scaled to [0, 1]",
    }
    if split == "lake":
        protocol["val_note"] = ("Lake's split has two parts: training on the background alphabets; the validation "
                                "episodes (recalibration, model selection) are drawn from the evaluation alphabets "
                                "like the test episodes, with another seed, so they share the test classes (the "
                                "split has no third part; holding background alphabets out would change Lake's "
                                "training set). Use --split vinyals where validation must not see test classes")
        protocol["within_alphabet"] = (f"{num_test_tasks} fixed {ways}-way {shots}-shot episodes, each from one "
                                       "evaluation alphabet, no rotations, support and query images by different "
                                       "drawers (Lake et al.'s one-shot protocol), every image scored alone")
    return Benchmark("omniglot", train, val, test, None, protocol, classification=True, extra=extra)
