"""Functional networks, batched over any leading dims (tasks, samples, particles)."""

from .conv import (
    BATCH_NORM_MODES,
    CONTEXT_MODES,
    DOWNSAMPLE_MODES,
    TRANSDUCTIVE_MODES,
    Conv4,
    call_net,
)
from .mlp import ACTIVATIONS, MLP, FunctionalNet
from .spec import ParamSpec

__all__ = ["ACTIVATIONS", "BATCH_NORM_MODES", "CONTEXT_MODES", "DOWNSAMPLE_MODES", "MLP", "TRANSDUCTIVE_MODES",
           "Conv4", "FunctionalNet", "ParamSpec", "call_net"]
