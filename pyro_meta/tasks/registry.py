"""Benchmark registry: ``get_benchmark(name, **protocol)`` -> train stream, validation and test tasks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .batch import TaskBatch
from .regression import ProtocolError, RegressionFamily, Sinusoid, SinusoidLine


class TaskStream:
    """An endless, seeded stream of training meta-batches whose position can be saved and restored.

    :param family: the task family to draw from.
    :param meta_batch: tasks per meta-batch ``T``.
    :param shots: support points per task; :param queries: query points per task.
    :param seed: seed of the stream's own generator (independent of the global torch RNG).
    """

    def __init__(self, family: RegressionFamily, meta_batch: int, shots: int, queries: int, seed: int):
        if meta_batch < 1:
            raise ProtocolError(f"meta_batch must be a positive integer, got {meta_batch!r}")
        family.check(shots, queries)
        self.family, self.meta_batch, self.shots, self.queries = family, meta_batch, shots, queries
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> TaskBatch:
        return self.family.sample(self.meta_batch, self.shots, self.queries, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark provides: a training stream and fixed, seeded validation and test tasks."""

    name: str
    train: TaskStream
    val: TaskBatch
    test: TaskBatch
    family: RegressionFamily
    protocol: dict[str, Any]


# Seeds of the fixed evaluation sets: part of the benchmark's definition, not of a run.
VAL_SEED = 1_000_003
TEST_SEED = 2_000_003

_FAMILIES = {"sinusoid": Sinusoid, "sinusoid_line": SinusoidLine}
BENCHMARKS = {
    "sinusoid": "MAML's sinusoid regression: A~U[0.1,5], phase~U[0,pi], x~U[-5,5], noiseless",
    "sinusoid_line": "PLATIPUS's ambiguous tasks: sinusoid or line, noise std 0.3",
}


def get_benchmark(
    name: str,
    shots: int = 5,
    queries: int | None = None,
    meta_batch: int = 25,
    eval_queries: int = 100,
    num_val_tasks: int = 100,
    num_test_tasks: int = 600,
    seed: int = 0,
) -> Benchmark:
    """Build a benchmark.

    :param name: one of :data:`BENCHMARKS`.
    :param shots: support points per task (train and evaluation).
    :param queries: query points per training task; default ``shots`` (MAML draws 2K points and
        splits them K/K).
    :param eval_queries: query points per evaluation task.
    :param seed: seed of the training stream; the evaluation sets have fixed seeds of their own.
    """
    if name not in _FAMILIES:
        raise ProtocolError(f"unknown benchmark {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    family = _FAMILIES[name]()
    queries = shots if queries is None else queries
    train = TaskStream(family, meta_batch, shots, queries, seed)
    val = family.fixed(num_val_tasks, shots, eval_queries, VAL_SEED)
    test = family.fixed(num_test_tasks, shots, eval_queries, TEST_SEED)
    protocol = {
        "benchmark": name,
        "family": {k: v for k, v in asdict(family).items()},
        "shots": shots,
        "queries": queries,
        "meta_batch": meta_batch,
        "eval_queries": eval_queries,
        "num_val_tasks": num_val_tasks,
        "num_test_tasks": num_test_tasks,
        "val_seed": VAL_SEED,
        "test_seed": TEST_SEED,
    }
    return Benchmark(name, train, val, test, family, protocol)
