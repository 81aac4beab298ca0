"""Pieces that several methods share."""

from .adapt import sgd_adapt

__all__ = ["sgd_adapt"]
