"""Every test starts seeded, with Pyro's validation on and an empty param store.

Data. ``../shared`` (beside the repository) holds the real Omniglot; a user's clone has no such folder.
``PYRO_META_TEST_SHARED`` names another folder to use instead, and ``PYRO_META_TEST_SHARED=none`` hides it,
as on a fresh clone (``.ci/run`` runs the suite that way first). Tests that need some Omniglot use
:func:`omniglot_root`, a generated one in the canonical layout (``tests/omniglot_fixture.py``); tests about
the real data are marked ``real_data`` and are skipped, with the data root named, when it is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
_SHARED_SETTING = os.environ.get("PYRO_META_TEST_SHARED", "")
HIDDEN = _SHARED_SETTING.lower() == "none"
SHARED = Path(_SHARED_SETTING) if _SHARED_SETTING and not HIDDEN else REPO.parent / "shared"
REAL_OMNIGLOT = SHARED / "data" / "omniglot"
HAVE_REAL_OMNIGLOT = not HIDDEN and (REAL_OMNIGLOT / "images_background.zip").is_file()
REAL_REASON = (f"the real Omniglot at {REAL_OMNIGLOT} is hidden (PYRO_META_TEST_SHARED=none)" if HIDDEN else
               f"the real Omniglot is not at {REAL_OMNIGLOT} (set PYRO_META_TEST_SHARED to a folder holding "
               "data/omniglot)")


def pytest_collection_modifyitems(config, items):
    """Skip the ``real_data`` tests, with the data root named, when the real Omniglot is not there."""
    if HAVE_REAL_OMNIGLOT:
        return
    skip = pytest.mark.skip(reason=REAL_REASON)
    for item in items:
        if item.get_closest_marker("real_data") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory) -> Path:
    """A generated Omniglot data root (canonical zips, real alphabet names, random drawings; see
    ``tests/omniglot_fixture.py``), written once per session: 19 characters, 32 / 20 / 24 Vinyals
    train / val / test classes."""
    from omniglot_fixture import write_omniglot

    return write_omniglot(tmp_path_factory.mktemp("omniglot_small"))


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
