"""A progress bar whose rate and time left follow the recent steps.

tqdm's own rate is an exponential average over its refreshes; with a log file (one refresh every
30 s) and a slow first step (start-up, the first checkpoint), it reported "3.70 step/s, ETA 02:28"
for a run doing 250 steps/s. Here the rate is measured over the last ``window`` seconds of steps and
shown in the bar's postfix, so a terminal and a log file read the same, current number.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable

from tqdm.auto import tqdm

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class RecentRate:
    """Steps per second over the last ``window`` seconds (at least the last two updates).

    :param clock: a monotonic clock (injectable for tests).
    """

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.window, self.clock = window, clock
        self.marks: deque[tuple[float, int]] = deque()

    def update(self, n: int) -> None:
        now = self.clock()
        self.marks.append((now, n))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.window:
            self.marks.popleft()

    def rate(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None

    def text(self, done: int, total: int) -> str:
        r = self.rate()
        if r is None:
            return "measuring rate"
        shown = f"{r:.3g} step/s" if r >= 1 else f"{1 / r:.3g} s/step"
        return f"{shown}, {_hms((total - done) / r)} left"


class Progress:
    """``update()`` once per step; ``set(**values)`` for extra fields (loss, skipped)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True, window: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter, quiet: bool = False):
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                        dynamic_ncols=True, file=sys.stderr, bar_format=BAR_FORMAT,
                        mininterval=0.5 if interactive else 30.0)  # a log file gets a line every 30 s
        self.rate = RecentRate(window, clock)
        self.rate.update(initial)
        self.total, self.n, self.extra = total, initial, ""
        self.clock, self._last_text = clock, -1.0
        self.quiet = quiet  # no notes either (the ranks of a distributed run other than rank 0)

    def update(self) -> None:
        self.n += 1
        self.rate.update(self.n)
        now = self.clock()
        if now - self._last_text >= 0.25 or self.n == self.total:  # formatting every step would cost more
            self._last_text = now
            self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(1)

    def set(self, **values: object) -> None:
        self.extra = ", ".join(f"{k}={v}" for k, v in values.items())
        self.bar.set_postfix_str(self.postfix(), refresh=False)

    def postfix(self) -> str:
        text = self.rate.text(self.n, self.total)
        return f"{text}, {self.extra}" if self.extra else text

    def write(self, msg: str) -> None:
        """A line above the bar, on stderr (warnings and notes, never the results on stdout)."""
        if not self.quiet:
            self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
