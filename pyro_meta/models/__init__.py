"""Pyro generative models, one file per method."""

from .abml import ABML_OBJECTIVES, ABMLModel
from .amortized import AMORTIZE_CHOICES, AMORTIZED_OBJECTIVES, AmortizedModel
from .base import POINT_DIM, TASK_DIM, WeightSpaceModel, full_plate, observe, tasks_plate
from .bmaml import BMAMLModel
from .bnn import BNNRegression
from .maml import MSE_NOISE_STD, MAMLModel
from .platipus import PlatipusModel
from .versa import VERSAModel, num_classes

__all__ = ["ABML_OBJECTIVES", "ABMLModel", "AMORTIZED_OBJECTIVES", "AMORTIZE_CHOICES", "AmortizedModel", "BMAMLModel", "BNNRegression", "MAMLModel", "MSE_NOISE_STD", "POINT_DIM", "PlatipusModel", "TASK_DIM", "VERSAModel", "WeightSpaceModel",
           "full_plate", "num_classes", "observe", "tasks_plate"]
