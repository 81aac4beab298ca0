"""Pieces that several methods share."""

from .adapt import sgd_adapt
from .losses import MLPIP, PredictiveELBO, log_mean_exp

__all__ = ["MLPIP", "PredictiveELBO", "log_mean_exp", "sgd_adapt"]
