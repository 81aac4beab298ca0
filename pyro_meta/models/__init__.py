"""Pyro generative models, one file per method."""

from .abml import ABMLModel
from .base import POINT_DIM, TASK_DIM, WeightSpaceModel, observe, tasks_plate
from .maml import MSE_NOISE_STD, MAMLModel

__all__ = ["ABMLModel", "MAMLModel", "MSE_NOISE_STD", "POINT_DIM", "TASK_DIM", "WeightSpaceModel",
           "observe", "tasks_plate"]
