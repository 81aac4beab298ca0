"""Atomic file writes that respect the user's umask.

Every file a run writes (``config.json``, ``eval.json``, ``checkpoint.pt``, ``posterior.nc``, the
Omniglot cache) goes through :func:`atomic_write`: the content goes to a temporary file in the same
folder, is flushed and fsynced, given the permissions a plain ``open(path, "w")`` would have given
it, then renamed over ``path``. A crash leaves the old file or the new one, never half of one.
``tempfile.mkstemp`` creates its file with mode 0600; without the ``chmod`` every atomically written
file would be private to its owner, unlike the rest of a run directory.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so the two calls are serialized)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file beside it, then it is renamed.

    :param write: called with the open temporary file (binary or text, per ``binary``).
    :returns: ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Strict JSON (no NaN: callers pass :func:`pyro_meta.train.json_safe` data), indented."""

    def write(f: IO[str]) -> None:
        json.dump(data, f, indent=2, default=str, allow_nan=False)
        f.write("\n")

    return atomic_write(path, write, binary=False)
