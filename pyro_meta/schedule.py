"""Meta learning-rate schedules: the rate of update ``k + 1`` is ``meta_lr * factor(k)``.

A schedule is a small JSON object (``RunConfig.lr_schedule``, written to ``config.json``)::

    {"name": "constant"}                                          # the default
    {"name": "cosine", "total_steps": 70000, "min_factor": 0.0}   # half a cosine from 1 to min_factor
    {"name": "exponential", "gamma": 0.98, "every": 1000}         # x gamma every `every` steps
    ... and any of them with "warmup_steps": W                    # linear warm-up over the first W steps

``every`` is the schedule's epoch in meta-batches: ``1`` decays every step, BMAML's "0.98 per epoch"
is ``{"name": "exponential", "gamma": 0.98, "every": <meta-batches per epoch>}``. After warm-up,
the schedule's own clock starts at 0; cosine stays at ``min_factor`` past ``total_steps``.

The factor is a pure function of the step number, so a resumed run gets exactly the rates an
uninterrupted one would, and a schedule changed on resume applies from the resumed step on. (We
set the rate ourselves rather than through ``torch.optim.lr_scheduler``: its chainable schedulers
carry state in the optimizer's parameter groups that a changed schedule on resume would have to
undo, and a closed form needs none.)
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = {
    "constant": {"warmup_steps"},
    "cosine": {"warmup_steps", "total_steps", "min_factor"},
    "exponential": {"warmup_steps", "gamma", "every"},
}


class ScheduleError(ValueError):
    """A learning-rate schedule that cannot be used; the message says what was expected."""


def normalize_schedule(spec: dict[str, Any] | str | None, steps: int | None = None) -> dict[str, Any]:
    """The full form of ``spec`` (every key filled in), validated.

    :param spec: a schedule object, a bare name, or ``None`` (constant).
    :param steps: the run's total steps: cosine's default ``total_steps``.
    """
    if spec is None:
        spec = {"name": "constant"}
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ScheduleError(f"lr_schedule must be an object like {{'name': 'cosine'}} or a name, got {spec!r}")
    name = spec.get("name", "constant")
    if name not in SCHEDULES:
        raise ScheduleError(f"lr_schedule name must be one of {sorted(SCHEDULES)}, got {name!r}")
    unknown = set(spec) - SCHEDULES[name] - {"name"}
    if unknown:
        raise ScheduleError(f"lr_schedule {name!r} takes {sorted(SCHEDULES[name])}, not {sorted(unknown)}")
    out: dict[str, Any] = {"name": name, "warmup_steps": spec.get("warmup_steps", 0)}
    _want_int(out, "warmup_steps", minimum=0)
    if name == "cosine":
        total = spec.get("total_steps", steps)
        if total is None:
            raise ScheduleError("lr_schedule 'cosine' needs total_steps (or a run whose steps are known)")
        out.update(total_steps=total, min_factor=spec.get("min_factor", 0.0))
        _want_int(out, "total_steps", minimum=1)
        _want_float(out, "min_factor", 0.0, 1.0)
        if out["total_steps"] <= out["warmup_steps"]:
            raise ScheduleError(f"lr_schedule 'cosine': total_steps ({out['total_steps']}) must exceed "
                                f"warmup_steps ({out['warmup_steps']})")
    elif name == "exponential":
        if "gamma" not in spec:
            raise ScheduleError("lr_schedule 'exponential' needs gamma, the factor per `every` steps (e.g. 0.98)")
        out.update(gamma=spec["gamma"], every=spec.get("every", 1))
        _want_float(out, "gamma", 0.0, 1.0, open_low=True)
        _want_int(out, "every", minimum=1)
    return out


def _want_int(d: dict[str, Any], key: str, minimum: int) -> None:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ScheduleError(f"lr_schedule {key} must be an integer >= {minimum}, got {v!r}")


def _want_float(d: dict[str, Any], key: str, lo: float, hi: float, open_low: bool = False) -> None:
    v = d[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > lo if open_low else v >= lo) and v <= hi
    if not ok:
        raise ScheduleError(f"lr_schedule {key} must be a number in {'(' if open_low else '['}{lo}, {hi}], got {v!r}")
    d[key] = float(v)


def lr_factor(spec: dict[str, Any], step: int) -> float:
    """The factor on ``meta_lr`` for the update that follows ``step`` completed updates."""
    warm = spec.get("warmup_steps", 0)
    if step < warm:
        return (step + 1) / warm
    k = step - warm
    name = spec["name"]
    if name == "constant":
        return 1.0
    if name == "cosine":
        horizon = spec["total_steps"] - warm
        t = min(k, horizon) / horizon
        lo = spec["min_factor"]
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
    if name == "exponential":
        return spec["gamma"] ** (k // spec["every"])
    raise ScheduleError(f"unknown lr_schedule {name!r}")


def describe(spec: dict[str, Any]) -> str:
    """One line for logs: ``cosine to 0 over 70000 steps, 500 warm-up steps``."""
    name = spec["name"]
    text = {"constant": "constant",
            "cosine": f"cosine to {spec.get('min_factor')} x over {spec.get('total_steps')} steps",
            "exponential": f"x {spec.get('gamma')} every {spec.get('every')} steps"}.get(name, name)
    if spec.get("warmup_steps"):
        text += f", linear warm-up over {spec['warmup_steps']} steps"
    return text
