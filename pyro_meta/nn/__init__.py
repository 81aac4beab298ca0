"""Functional networks, batched over any leading dims (tasks, samples, particles)."""

from .conv import BATCH_NORM_MODES, DOWNSAMPLE_MODES, Conv4
from .mlp import ACTIVATIONS, MLP, FunctionalNet
from .spec import ParamSpec

__all__ = ["ACTIVATIONS", "BATCH_NORM_MODES", "DOWNSAMPLE_MODES", "MLP", "Conv4", "FunctionalNet",
           "ParamSpec"]
