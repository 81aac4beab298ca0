"""Pyro guides, one file per method."""

from .abml import ABMLGuide, gaussian_kl
from .maml import MAMLGuide

__all__ = ["ABMLGuide", "MAMLGuide", "gaussian_kl"]
