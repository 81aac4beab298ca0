"""What keeps a run directory safe: checkpoints that cannot run code and carry a digest, one writer
per run directory, and no leftovers of interrupted writes.

**Checkpoint file format 2.** A header line ``PYRO_META_CHECKPOINT 2 sha256=<64 hex digits>`` then
the ``torch.save`` bytes of the checkpoint dict. Loading reads the file, checks the SHA-256 of the
payload against the header (``hashlib``; a flipped bit is a clear error naming the file, never a
silent resume), and only then unpickles it with ``torch.load(weights_only=True)``, whose allow-list
(tensors, dicts, lists, numbers, strings) is all a checkpoint holds: a planted pickle cannot run
code. Format 1 files (plain ``torch.save``, written before the digest) still load, with the same
``weights_only=True`` and a note that they carry no digest.

**One writer.** :class:`RunLock` takes an exclusive lock on ``<run>/.lock`` through ``filelock``
(already installed with torch; it uses ``fcntl.flock`` on Unix, so the kernel frees the lock of a
killed process: a stale lock never blocks) and records the holder (pid, host, command, start time) in
``<run>/.lock.holder`` for the message a second writer gets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from .io import atomic_write

CHECKPOINT_FORMAT = 2
MAGIC = b"PYRO_META_CHECKPOINT"
# what every checkpoint holds (format 1 and 2)
REQUIRED_KEYS = ("format", "step", "skipped", "seconds", "learner", "optimizer", "rng", "run_config")
LOCK = ".lock"
HOLDER = ".lock.holder"
# temporary files of interrupted atomic writes (pyro_meta.io.atomic_write, export_run)
TEMP_PATTERNS = (".*.tmp",)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, damaged, or from a different run."""


class RunLockedError(RuntimeError):
    """Another process is writing this run directory."""


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {str(path)!r} is damaged ({what}); it was not used. Restore it from a copy, or start the "
        f"run again (delete the folder, or train into another --out)")


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` as a format-2 checkpoint, atomically (a crash leaves the old file or the new one)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    header = MAGIC + b" %d sha256=%s\n" % (CHECKPOINT_FORMAT, hashlib.sha256(payload).hexdigest().encode())

    def write(f) -> None:  # noqa: ANN001 - a binary file
        f.write(header)
        f.write(payload)

    atomic_write(path, write)


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint: digest checked (``verify``), unpickled with ``weights_only=True``, keys checked.

    :raises CheckpointError: missing, damaged (digest mismatch, truncated), not a checkpoint, or
        lacking a key; the message names the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}") from None
    if data.startswith(MAGIC):
        end = data.find(b"\n")
        parts = data[:end].split() if end > 0 else []
        if len(parts) != 3 or not parts[2].startswith(b"sha256="):
            raise _damaged(path, "its header is unreadable")
        if parts[1] != str(CHECKPOINT_FORMAT).encode():
            raise CheckpointError(f"checkpoint {str(path)!r} has format {parts[1].decode(errors='replace')}; this "
                                  f"version of pyro_meta reads formats 1 and {CHECKPOINT_FORMAT}")
        payload = data[end + 1:]
        if verify and hashlib.sha256(payload).hexdigest().encode() != parts[2][len(b"sha256="):]:
            raise _damaged(path, "its SHA-256 digest does not match its contents: a changed or truncated file")
    elif data[:2] == b"PK":  # format 1: a plain torch.save zip, written before the digest
        payload = data
        warnings.warn(f"{path}: a format-1 checkpoint (no digest); it is loaded without an integrity check",
                      stacklevel=2)
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or not a checkpoint: it starts with neither "
                              "the format-2 header nor a format-1 zip. Restore it from a copy, or start the run "
                              "again (delete the folder, or train into another --out)")
    try:
        ckpt = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: damaged, or not allow-listed (code)
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted or holds objects other than tensors and plain data, which "
            f"are never loaded (they could run code): {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, CHECKPOINT_FORMAT):
        raise CheckpointError(f"{str(path)!r} is not a pyro_meta checkpoint (format 1 or {CHECKPOINT_FORMAT})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise _damaged(path, f"it lacks {', '.join(repr(k) for k in missing)}")
    return ckpt


# ---------------------------------------------------------------------------------------------- lock
_HELD: dict[Path, tuple[FileLock, int]] = {}


class RunLock:
    """Exclusive, re-entrant (within a process) lock on a run directory.

    ``with RunLock(run_dir, "train"):`` raises :class:`RunLockedError` at once, naming the holder, if
    another process holds it. The folder must exist.
    """

    def __init__(self, run_dir: str | Path, purpose: str = "write"):
        self.run_dir, self.purpose = Path(run_dir), purpose
        self.key = self.run_dir.resolve()

    def __enter__(self) -> RunLock:
        if self.key in _HELD:
            lock, n = _HELD[self.key]
            _HELD[self.key] = (lock, n + 1)
            return self
        if not self.run_dir.is_dir():
            raise FileNotFoundError(2, "no such run directory", str(self.run_dir))
        lock = FileLock(str(self.run_dir / LOCK), timeout=0)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunLockedError(f"{str(self.run_dir)!r} is in use by another process ({holder(self.run_dir)}); "
                                 f"wait for it to finish or stop it, or use another folder") from None
        _HELD[self.key] = (lock, 1)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "command": " ".join(sys.argv)[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            (self.run_dir / HOLDER).write_text(json.dumps(info) + "\n")
        except OSError:
            pass  # the lock holds without the note; only the message to a second writer is poorer
        return self

    def __exit__(self, *exc: object) -> None:
        lock, n = _HELD[self.key]
        if n > 1:
            _HELD[self.key] = (lock, n - 1)
            return
        del _HELD[self.key]
        try:
            (self.run_dir / HOLDER).unlink(missing_ok=True)
        except OSError:
            pass
        lock.release()


def holder(run_dir: str | Path) -> str:
    """Who holds the lock, as recorded in ``.lock.holder`` (or that it is unknown)."""
    try:
        info = json.loads((Path(run_dir) / HOLDER).read_text())
        return (f"pid {info['pid']} on {info['host']}, {info['purpose']} since {info['since']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def clean_temp_files(run_dir: str | Path) -> list[Path]:
    """Remove what interrupted atomic writes left behind (``.<name>.*.tmp``); call with the lock held."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for pattern in TEMP_PATTERNS:
        for p in run_dir.glob(pattern):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
