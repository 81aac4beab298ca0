"""Pyro guides, one file per method."""

from .abml import ABMLGuide, gaussian_kl
from .maml import MAMLGuide
from .versa import VERSAGuide, class_means

__all__ = ["ABMLGuide", "MAMLGuide", "VERSAGuide", "class_means", "gaussian_kl"]
