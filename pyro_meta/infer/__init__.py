"""Pieces that several methods share."""

from .adapt import polyak_adapt, sgd_adapt
from .elbo import LeanTrace_ELBO, LeanTraceMeanField_ELBO
from .losses import MLPIP, BFALoss, ChaserLoss, PredictiveELBO, log_mean_exp
from .svgd import ScalarRBFKernel, svgd_adapt, svgd_direction, svgd_step

__all__ = ["BFALoss", "ChaserLoss", "LeanTrace_ELBO", "LeanTraceMeanField_ELBO", "MLPIP", "PredictiveELBO", "ScalarRBFKernel", "log_mean_exp", "polyak_adapt", "sgd_adapt",
           "svgd_adapt", "svgd_direction", "svgd_step"]
