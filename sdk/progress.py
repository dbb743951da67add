"""Progress and ETA from the steps ``log_metrics`` already sees: a tqdm bar on a terminal, and the rate and
ETA as metrics. The tracker calls ``tick`` only when a step passes ``next_step``, so the hot path pays one
comparison; ``tick`` chooses the next threshold so real work happens about every ``interval`` seconds."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress", "RunProgress", "NEVER", "terminal_attached"]

#: A step threshold no run reaches: progress off.
NEVER = 1 << 62


def terminal_attached() -> bool:
    """The bar is drawn only when both stdout and stderr (where tqdm writes) are terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class Progress:
    """Rate, ETA and the bar for one run of ``total`` steps.

    ``tick(step)`` returns ``(next_step, metrics)``: the step at which to call again, and the metrics to log
    now (``progress/eta_seconds``, ``progress/steps_per_second``) or None when it is not time yet.
    """

    def __init__(self, total: int, *, bar: bool | None = None, interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, file: Any = None, smoothing: float = 0.3) -> None:
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total!r}")
        self.total = total
        self.interval = interval
        self.clock = clock
        self.smoothing = smoothing
        self.rate = 0.0
        self.eta: float | None = None
        self._last: tuple[float, int] | None = None
        self._bar: Any = None
        self._bar_wanted = terminal_attached() if bar is None else bar
        self._file = file

    def done_steps(self, step: int) -> int:
        """Steps completed when ``step`` was logged: 0-based loops log total-1 last, 1-based ones total."""
        return max(0, min(step + 1, self.total))

    def tick(self, step: int) -> tuple[int, dict[str, float] | None]:
        now = self.clock()
        if self._last is None:
            self._last = (now, step)
            return step + 1, None
        t0, s0 = self._last
        dt = now - t0
        if dt < self.interval:
            # Too early: guess how many more steps fill the interval and come back then.
            pace = (step - s0) / dt if dt > 0 and step > s0 else 0.0
            return step + max(1, int(pace * (self.interval - dt))), None
        inst = max(0, step - s0) / dt
        self.rate = inst if self.rate == 0.0 else self.smoothing * inst + (1 - self.smoothing) * self.rate
        done = self.done_steps(step)
        self.eta = (self.total - done) / self.rate if self.rate > 0 else float("inf")
        self._last = (now, step)
        self._draw(done)
        nxt = step + max(1, int(self.rate * self.interval))
        return nxt, {"progress/eta_seconds": self.eta, "progress/steps_per_second": self.rate}

    def _draw(self, done: int) -> None:
        if not self._bar_wanted:
            return
        if self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                self._bar_wanted = False  # tqdm is optional; the metrics still flow
                return
            self._bar = tqdm(total=self.total, initial=0, unit="step", dynamic_ncols=True, mininterval=0,
                             file=self._file, smoothing=self.smoothing)
        self._bar.update(done - self._bar.n)

    @property
    def bar(self) -> Any:
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RunProgress:
    """A tracker's progress: the Progress of ``start(total)``, ticked from log_metrics' thresholds; its
    metrics go out through ``emit(step, metrics)``. A broken terminal turns it off, never the run."""

    def __init__(self, emit: Callable[[int, dict[str, float]], None]) -> None:
        self.emit = emit
        self.progress: Progress | None = None

    def start(self, total: int, *, bar: bool | None) -> None:
        self.close()
        self.progress = Progress(total, bar=bar)

    def tick(self, step: int) -> int:
        """The next step at which to call again (NEVER once off)."""
        p = self.progress
        if p is None:
            return NEVER
        try:
            nxt, metrics = p.tick(step)
            if metrics is not None:
                self.emit(step, metrics)
            return nxt
        except Exception as exc:  # a broken terminal must not stop training
            logging.getLogger("flightlog").warning("flightlog: progress display disabled: %r", exc)
            self.progress = None
            return NEVER

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
