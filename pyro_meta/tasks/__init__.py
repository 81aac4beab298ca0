"""Where tasks come from: TaskBatch, task families and the benchmark registry."""

from .batch import TaskBatch, TaskBatchError
from .custom import TaskFamily, register_benchmark, unregister_benchmark
from .episodes import EpisodeSampler, fixed_episodes, within_alphabet_episodes
from .images import preprocess_images, task_from_folders
from .omniglot import (
    ClassPool,
    DataError,
    OmniglotData,
    class_pool,
    default_cache_dir,
    download_omniglot,
    find_omniglot,
    lake_split,
    load_omniglot,
    omniglot_characters,
    vinyals_split,
)
from .registry import (
    BENCHMARKS,
    CLASSIFICATION_BENCHMARKS,
    Benchmark,
    TaskStream,
    all_benchmarks,
    get_benchmark,
    is_known_benchmark,
)
from .regression import ProtocolError, RegressionFamily, Sinusoid, SinusoidBMAML, SinusoidLine
from .stream import BatchCycle, as_task_source

__all__ = [
    "preprocess_images",
    "task_from_folders",
    "within_alphabet_episodes",
    "BENCHMARKS",
    "BatchCycle",
    "TaskFamily",
    "all_benchmarks",
    "as_task_source",
    "is_known_benchmark",
    "register_benchmark",
    "unregister_benchmark",
    "CLASSIFICATION_BENCHMARKS",
    "Benchmark",
    "ProtocolError",
    "RegressionFamily",
    "Sinusoid",
    "SinusoidBMAML",
    "SinusoidLine",
    "TaskBatch",
    "TaskBatchError",
    "TaskStream",
    "get_benchmark",
    "ClassPool",
    "DataError",
    "EpisodeSampler",
    "OmniglotData",
    "class_pool",
    "default_cache_dir",
    "download_omniglot",
    "find_omniglot",
    "fixed_episodes",
    "lake_split",
    "load_omniglot",
    "omniglot_characters",
    "vinyals_split",
]
