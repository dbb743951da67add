"""Retry schedule and circuit breaker as plain data and arithmetic (sans-IO, injectable clock)."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RetryPolicy", "CircuitBreaker"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped at ``maximum``; a backend's ``Retry-After`` wins when longer,
    up to ``maximum`` too (a ``Retry-After: 86400`` must not park a sink for a day)."""

    initial: float = 0.5
    maximum: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of the delay that is randomised

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        base = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        d = base * (1.0 - self.jitter) + base * self.jitter * rng.random()
        if retry_after is not None and retry_after > d:
            d = min(retry_after, self.maximum)
        return d


@dataclass
class CircuitBreaker:
    """closed -> open after ``threshold`` consecutive failures; half-open after ``reset_after`` seconds."""

    threshold: int = 5
    reset_after: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = field(default=None)

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.reset_after else "open"

    def allow(self) -> bool:
        return self.state != "open"

    def wait_time(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.reset_after - (self.clock() - self.opened_at))

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def record_failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = self.clock()  # a failed half-open probe re-opens
