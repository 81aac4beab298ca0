"""Where tasks come from: TaskBatch, task families and the benchmark registry."""

from .batch import TaskBatch, TaskBatchError
from .registry import BENCHMARKS, Benchmark, TaskStream, get_benchmark
from .regression import ProtocolError, RegressionFamily, Sinusoid, SinusoidLine

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "ProtocolError",
    "RegressionFamily",
    "Sinusoid",
    "SinusoidLine",
    "TaskBatch",
    "TaskBatchError",
    "TaskStream",
    "get_benchmark",
]
