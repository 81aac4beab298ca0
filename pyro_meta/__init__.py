"""pyro_meta: Bayesian meta-learning written as Pyro programs."""

from .learner import MetaLearner
from .tasks import TaskBatch, get_benchmark

__version__ = "0.1.0"
__all__ = ["MetaLearner", "TaskBatch", "get_benchmark", "__version__"]
