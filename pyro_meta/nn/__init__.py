"""Functional networks, batched over any leading dims (tasks, samples, particles)."""

from .mlp import ACTIVATIONS, MLP, FunctionalNet
from .spec import ParamSpec

__all__ = ["ACTIVATIONS", "MLP", "FunctionalNet", "ParamSpec"]
