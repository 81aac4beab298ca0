"""What ``fit`` accepts as a source of meta-batches, and how it saves its position."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

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
