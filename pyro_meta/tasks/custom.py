"""Your own task family: a seeded function becomes a resumable training stream plus fixed, seeded
validation and test sets, usable by ``fit``, ``evaluate``, ``run_many`` and the CLI.

A task family is a function (or any callable, e.g. a small class instance) with the signature::

    make_tasks(num_tasks: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch

that draws **every** random number from ``generator`` (``torch.rand(..., generator=generator)``).
That one rule is what makes the training stream resumable (its position is the generator's state)
and the evaluation sets fixed (each is drawn from a generator seeded with the benchmark's own seed).
:class:`TaskFamily` checks it on construction: the same seed must give the same tasks, and two
draws in a row must differ.

Register it under a name (``register_benchmark("mytasks", make_tasks)``), or name it by its import
path (``"mypkg.tasks:make_tasks"``) wherever a benchmark name goes: ``get_benchmark``, ``RunConfig``,
``pyro-meta train mypkg.tasks:make_tasks --method abml`` (the current folder is searched too). An import
path also works in a new process
(``pyro-meta evaluate``, ``--resume``, ``run_many``'s workers); a registration lives in the process
that made it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .batch import TaskBatch
from .regression import ProtocolError, check_counts

TaskFn = Callable[[int, int, int, torch.Generator], TaskBatch]

# how many tasks the construction-time checks draw
_PROBE_TASKS = 2
_PROBE_SEED = 12345


@dataclass(frozen=True)
class TaskFamily:
    """A task family from a seeded function ``make_tasks(num_tasks, shots, queries, generator)``.

    :param make_tasks: the function; see the module docstring for its contract.
    :param name: the benchmark name (an import path ``module:attr`` or a registered name).
    :param description: one line for ``pyro-meta list``.
    :param x_range: for 1-D regression families, the input range the plots draw predictive bands
        over (default: the range of a probe batch's inputs).
    :param truth: optional ``truth(info, x) -> y``: the noiseless function of each task from its
        ``batch.info`` (plots draw it when given), ``x [T, N, 1]`` -> ``[T, N, 1]``.

    Constructing one checks the function (:meth:`check_function`); ``kind``, ``x_shape``,
    ``y_dim`` and ``ways`` describe what it draws.
    """

    make_tasks: TaskFn
    name: str = "custom"
    description: str = ""
    x_range: tuple[float, float] | None = None
    truth: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None
    probe: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.make_tasks):
            raise TypeError(f"task family {self.name!r}: make_tasks must be callable, got "
                            f"{type(self.make_tasks).__name__}")
        if not self.probe:
            self.probe.update(self.check_function())
        if self.x_range is None and "x_range" in self.probe:
            object.__setattr__(self, "x_range", self.probe["x_range"])  # what the plots draw over

    # ---------------------------------------------------------------- the contract, checked
    def _call(self, num_tasks: int, shots: int, queries: int, g: torch.Generator) -> TaskBatch:
        out = self.make_tasks(num_tasks, shots, queries, g)
        if not isinstance(out, TaskBatch):
            raise TypeError(f"task family {self.name!r}: make_tasks(num_tasks, shots, queries, generator) must "
                            f"return a pyro_meta.TaskBatch, got {type(out).__name__}")
        if out.num_tasks != num_tasks:
            raise ProtocolError(f"task family {self.name!r}: asked for {num_tasks} tasks, got a TaskBatch "
                                f"of {out.num_tasks}")
        return out

    def check_function(self, shots: int = 2, queries: int = 3) -> dict[str, Any]:
        """Draw a few tiny batches and check the contract; returns what the family draws."""
        a = self._call(_PROBE_TASKS, shots, queries, torch.Generator().manual_seed(_PROBE_SEED))
        b = self._call(_PROBE_TASKS, shots, queries, torch.Generator().manual_seed(_PROBE_SEED))
        if not _same(a, b):
            raise ProtocolError(
                f"task family {self.name!r}: two calls with generators seeded alike gave different tasks. "
                "make_tasks must draw every random number from the generator it is given (e.g. "
                "torch.rand(..., generator=generator)), not from torch's global RNG or numpy; otherwise "
                "the test set is not fixed and a resumed run does not see the tasks it would have seen")
        g = torch.Generator().manual_seed(_PROBE_SEED)
        first = self._call(_PROBE_TASKS, shots, queries, g)
        second = self._call(_PROBE_TASKS, shots, queries, g)
        if _same(first, second):
            raise ProtocolError(
                f"task family {self.name!r}: two draws in a row from one generator gave the same tasks: "
                "make_tasks ignores its generator, so every meta-batch would hold the same tasks")
        classification = first.is_classification
        info: dict[str, Any] = {
            "kind": "classification" if classification else "regression",
            "x_shape": tuple(first.x_support.shape[2:]),
            "y_dim": None if classification else int(first.y_support.shape[-1]),
            "ways": max(int(first.y_support.max()), int(first.y_query.max())) + 1 if classification else None,
        }
        if not classification and info["x_shape"] == (1,):
            x = torch.cat([first.x_support, first.x_query], 1)
            info["x_range"] = (float(x.min()), float(x.max()))
        return info

    # ---------------------------------------------------------------- what a stream and a benchmark use
    @property
    def kind(self) -> str:
        return self.probe["kind"]

    def check(self, shots: int, queries: int) -> None:
        check_counts(self.name, shots, queries)

    def sample(self, num_tasks: int, shots: int, queries: int, g: torch.Generator) -> TaskBatch:
        """Fresh training tasks from the stream's generator ``g``."""
        return self._call(num_tasks, shots, queries, g)

    def fixed(self, num_tasks: int, shots: int, queries: int, seed: int) -> TaskBatch:
        """Seeded evaluation tasks: the same for every run of this family and protocol."""
        self.check(shots, queries)
        return self._call(num_tasks, shots, queries, torch.Generator().manual_seed(seed))

    def function(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.truth is None:
            raise NotImplementedError(f"task family {self.name!r} has no truth function")
        return self.truth(params, x)


def _same(a: TaskBatch, b: TaskBatch) -> bool:
    for name in ("x_support", "y_support", "x_query", "y_query"):
        u, v = getattr(a, name), getattr(b, name)
        if (u is None) != (v is None) or (u is not None and (u.shape != v.shape or not torch.equal(u, v))):
            return False
    return True


# name -> TaskFamily, for families registered in this process
_REGISTRY: dict[str, TaskFamily] = {}


def register_benchmark(name: str, make_tasks: TaskFn | TaskFamily, description: str = "",
                       x_range: tuple[float, float] | None = None, truth: Callable | None = None,
                       replace: bool = False) -> TaskFamily:
    """Make ``make_tasks`` available as benchmark ``name`` in this process (``get_benchmark(name)``,
    ``RunConfig(benchmark=name)``). A built-in name cannot be taken; an existing registration only with
    ``replace=True``. Returns the checked :class:`TaskFamily`."""
    from .registry import BENCHMARKS

    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a benchmark name must be a non-empty string without ':', got {name!r}")
    if name in BENCHMARKS:
        raise ValueError(f"{name!r} is a built-in benchmark; register yours under another name")
    if name in _REGISTRY and not replace:
        raise ValueError(f"benchmark {name!r} is already registered; pass replace=True to replace it")
    family = make_tasks if isinstance(make_tasks, TaskFamily) else _as_family(
        make_tasks, name, description, x_range, truth)
    _REGISTRY[name] = family
    return family


def _as_family(obj: Any, name: str, description: str = "", x_range: tuple[float, float] | None = None,
               truth: Callable | None = None) -> TaskFamily:
    """A function, or a family object with ``sample(num_tasks, shots, queries, generator)`` (such as a
    :class:`~pyro_meta.tasks.RegressionFamily` subclass instance), as a :class:`TaskFamily`."""
    if not callable(obj) and hasattr(obj, "sample"):
        fn = getattr(obj, "function", None)
        return TaskFamily(obj.sample, name=name, description=description or _first_line(obj),
                          x_range=x_range or getattr(obj, "x_range", None),
                          truth=truth or (fn if callable(fn) else None))
    return TaskFamily(obj, name=name, description=description or _first_line(obj),
                      x_range=x_range or getattr(obj, "x_range", None), truth=truth or getattr(obj, "truth", None))


def unregister_benchmark(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_benchmarks() -> dict[str, str]:
    return {k: v.description for k, v in _REGISTRY.items()}


def is_import_path(name: str) -> bool:
    return isinstance(name, str) and ":" in name


def custom_family(name: str) -> TaskFamily | None:
    """The :class:`TaskFamily` behind a registered name or a ``module:attr`` import path (``None`` for
    any other name). ``attr`` may be a function, a :class:`TaskFamily`, an object with the function's
    signature, or a class whose no-argument instance is one."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not is_import_path(name):
        return None
    if name not in _IMPORTED:  # imported and checked once per process
        _IMPORTED[name] = _import_family(name)
    return _IMPORTED[name]


_IMPORTED: dict[str, TaskFamily] = {}


def _import_family(name: str) -> TaskFamily:
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` would: a module in the current folder is found
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ProtocolError(f"benchmark {name!r}: cannot import module {module_name!r} ({e}); is it "
                            "installed or on PYTHONPATH (the current folder is, for `python -m` runs)?") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ProtocolError(f"benchmark {name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, TaskFamily):
        return obj if obj.name == name else TaskFamily(obj.make_tasks, name, obj.description, obj.x_range,
                                                         obj.truth, dict(obj.probe))
    if inspect.isclass(obj):
        obj = obj()
    if not callable(obj) and not hasattr(obj, "sample"):
        raise ProtocolError(f"benchmark {name!r}: {attr!r} is a {type(obj).__name__}, not a task function "
                            "make_tasks(num_tasks, shots, queries, generator) -> TaskBatch")
    return _as_family(obj, name)


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "a user task family"
