"""What ``fit`` accepts as a source of meta-batches, and how it saves its position."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .batch import TaskBatch


class BatchCycle:
    """A fixed list of meta-batches, cycled in order (epoch after epoch); its position is saved in
    checkpoints, so a resumed run continues where it stopped.

    :param batches: a non-empty sequence of :class:`TaskBatch`.
    """

    def __init__(self, batches: Sequence[TaskBatch]):
        batches = list(batches)
        if not batches:
            raise ValueError("a list of meta-batches to train on must not be empty")
        for i, b in enumerate(batches):
            if not isinstance(b, TaskBatch):
                raise TypeError(f"meta-batch {i} of the list is a {type(b).__name__}, not a TaskBatch")
        self.batches, self.position = batches, 0

    def __iter__(self) -> BatchCycle:
        return self

    def to(self, device) -> BatchCycle:  # noqa: ANN001 - torch.device or str
        """Move every meta-batch to ``device`` once (this cycle's own list; the caller's batches stay)."""
        self.batches = [b.to(device) for b in self.batches]
        return self

    def __next__(self) -> TaskBatch:
        b = self.batches[self.position % len(self.batches)]
        self.position += 1
        return b

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "num_batches": len(self.batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_batches") != len(self.batches):
            raise ValueError(f"the checkpoint was written for a list of {state.get('num_batches')} meta-batches, "
                             f"this one has {len(self.batches)}")
        self.position = int(state["position"])


class HostDrawn(Protocol):
    """A seeded stream that :class:`DeviceChunks` can serve from a device: its ``__next__`` is
    ``_build(_draw_host())``, where ``_draw_host`` makes one step's random draws on the host (a tuple of
    small CPU tensors: the points of a regression meta-batch, the class and drawing indices of an
    episode, a binarized minibatch) and ``_build`` turns those draws, wherever they are, into the batch;
    ``state_dict`` returns a snapshot, not a live reference."""

    def _draw_host(self) -> tuple[Tensor, ...]: ...

    def _build(self, draws: tuple[Tensor, ...]) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DeviceChunks:
    """Serve a host-drawn stream (:class:`HostDrawn`) on ``device`` with one host-to-device copy per
    chunk of steps instead of one or more per step.

    The host makes the draws of up to ``max_chunk`` steps at once (each step drawn exactly as the stream
    alone draws it, in the same order; fewer steps when one step's draws are large, at most ``max_bytes``
    per chunk), stacks them and copies each stacked tensor once; each step then builds its batch from its
    slice, on the device. The batches are therefore the ones the stream gives on the CPU, moved.

    ``state_dict`` is the stream's own state at the next batch to be served (recorded before each step's
    draw), so a checkpoint written here is the one a CPU run writes at that step, and ``load_state_dict``
    restarts the stream there (the drawn-ahead chunk is dropped and drawn again).
    """

    def __init__(self, stream: HostDrawn, device: torch.device | str, max_chunk: int = 256,
                 max_bytes: int = 16 << 20):
        if not isinstance(max_chunk, int) or max_chunk < 1:
            raise ValueError(f"max_chunk must be a positive integer, got {max_chunk!r}")
        self.stream, self.device = stream, torch.device(device)
        self.max_chunk, self.max_bytes = max_chunk, max_bytes
        self._parts: tuple[Tensor, ...] = ()
        self._states: list[dict[str, Any]] = []
        self._next = 0
        self.transfers = 0  # chunks copied so far (a benchmark reads it)

    def __iter__(self) -> DeviceChunks:
        return self

    def to(self, device: torch.device | str) -> Any:  # noqa: ANN401 - the stream's own mover decides
        """Itself on its own device; elsewhere the stream's own mover, with the stream first put back at
        the next batch to be served (the draws made ahead are dropped, not skipped)."""
        if torch.device(device) == self.device:
            return self
        self.release()
        return self.stream.to(device)

    def release(self) -> None:
        """Put the stream back at the next batch to be served, dropping the draws made ahead: the stream
        used on its own afterwards (another ``fit`` call, say) continues where this one stopped."""
        self.load_state_dict(self.state_dict())

    def _refill(self) -> None:
        states, draws = [self.stream.state_dict()], [self.stream._draw_host()]
        size = sum(t.numel() * t.element_size() for t in draws[0])
        for _ in range(max(1, min(self.max_chunk, self.max_bytes // max(size, 1))) - 1):
            states.append(self.stream.state_dict())
            draws.append(self.stream._draw_host())
        self._parts = tuple(torch.stack(column).to(self.device) for column in zip(*draws))
        self._states, self._next = states, 0
        self.transfers += 1

    def __next__(self) -> Any:  # noqa: ANN401 - the stream's batch type
        if self._next >= len(self._states):
            self._refill()
        i, self._next = self._next, self._next + 1
        return self.stream._build(tuple(p[i] for p in self._parts))

    def state_dict(self) -> dict[str, Any]:
        return self._states[self._next] if self._next < len(self._states) else self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._parts, self._states, self._next = (), [], 0


def on_host(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"


def as_task_source(tasks: Iterable[TaskBatch] | TaskBatch) -> Iterator[TaskBatch]:
    """An iterator of meta-batches from what a user hands ``fit``: a task stream (kept as it is), a
    TaskBatch or a list of them (cycled by :class:`BatchCycle`), or any other iterable/iterator
    (e.g. a generator, which works but cannot be resumed exactly: it has no ``state_dict``)."""
    if isinstance(tasks, TaskBatch):
        return BatchCycle([tasks])
    if isinstance(tasks, (list, tuple)):
        return BatchCycle(tasks)
    if hasattr(tasks, "__next__"):
        return tasks  # type: ignore[return-value]
    if hasattr(tasks, "__iter__"):
        return iter(tasks)
    raise TypeError(f"tasks must be a task stream, a TaskBatch, a list of TaskBatch or an iterable of them, "
                    f"got {type(tasks).__name__}")


def place(source: Any, device) -> Any:  # noqa: ANN001 - torch.device or str
    """Let a task source keep its data on ``device`` when it can (it has ``to(device)``, as the built-in
    streams and samplers do): the meta-batches it yields are then on the device already."""
    mover = getattr(source, "to", None)
    return mover(device) if callable(mover) else source


def is_resumable(source: Any) -> bool:
    return hasattr(source, "state_dict") and hasattr(source, "load_state_dict")
