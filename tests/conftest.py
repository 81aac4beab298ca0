"""Every test starts seeded, with Pyro's validation on and an empty param store."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _fresh_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_default_dtype(torch.float32)
    with pyro.validation_enabled(True):
        yield
    # a test that switched to float64 must not hand it to the next module's module-scoped fixtures, which
    # are set up before this fixture runs again
    torch.set_default_dtype(torch.float32)


def assert_close(actual, expected, rtol: float = 1e-6, atol: float = 0.0, msg: str = "") -> None:
    """One tolerance-explicit comparison for every numeric test."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}" if msg else m)


def central_differences(loss_fn, param: torch.Tensor, idx: list[int], eps: float = 1e-6) -> torch.Tensor:
    """``d loss_fn() / d param.view(-1)[i]`` for ``i in idx`` by central differences, float64; ``loss_fn``
    must redraw the same randomness on every call (reseed inside it)."""
    flat = param.data.view(-1)
    out = []
    for i in idx:
        old = flat[i].item()
        flat[i] = old + eps
        up = float(loss_fn())
        flat[i] = old - eps
        down = float(loss_fn())
        flat[i] = old
        out.append((up - down) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)
