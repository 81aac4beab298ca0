"""Pyro guides, one file per method."""

from .abml import ABMLGuide, gaussian_kl
from .amortized import AmortizedGuide
from .bmaml import BMAMLGuide
from .maml import MAMLGuide
from .platipus import PlatipusGuide, PlatipusPredictiveGuide
from .versa import VERSAGuide, class_means

__all__ = ["ABMLGuide", "AmortizedGuide", "BMAMLGuide", "MAMLGuide", "PlatipusGuide", "PlatipusPredictiveGuide", "VERSAGuide", "class_means", "gaussian_kl"]
