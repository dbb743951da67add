"""Retention and best-checkpoint choice, sans-IO: registry entries in, decisions out."""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Entry", "is_improvement", "choose_best", "plan_retention"]


@dataclass(frozen=True)
class Entry:
    """One durable checkpoint as retention sees it; ``seq`` orders saves (higher is newer)."""

    path: str
    seq: int
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def _value(metrics: Mapping[str, float], monitor: str) -> float | None:
    v = metrics.get(monitor)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def is_improvement(new: float, old: float, mode: str) -> bool:
    """Strictly better: a tie keeps the earlier checkpoint."""
    return new < old if mode == "min" else new > old


def choose_best(current: Entry | None, new: Entry, *, is_best: bool | None, monitor: str | None, mode: str) -> bool:
    """Does ``new`` become the best checkpoint?

    An explicit ``is_best`` decides. Otherwise the monitored metric does: a value (never NaN) that beats
    the current best's, or any value when the current best has none. Without either, nothing changes.
    """
    if is_best is not None:
        return is_best
    if not monitor:
        return False
    value = _value(new.metrics, monitor)
    if value is None:
        return False
    old = None if current is None else _value(current.metrics, monitor)
    return old is None or is_improvement(value, old, mode)


def plan_retention(entries: Sequence[Entry], *, best: str | None, protected: Collection[str] = (),
                   max_keep: int = 0, keep_every_n_steps: int = 0) -> list[str]:
    """Paths to delete: everything but the newest ``max_keep`` (0 keeps all), the best, the ``protected``
    ones (being written or read), and those whose step is a multiple of ``keep_every_n_steps``."""
    if max_keep <= 0:
        return []
    newest = sorted(entries, key=lambda e: e.seq, reverse=True)
    keep = {e.path for e in newest[:max_keep]}
    if best is not None:
        keep.add(best)
    keep.update(protected)
    if keep_every_n_steps > 0:
        keep.update(e.path for e in entries if e.step % keep_every_n_steps == 0)
    return [e.path for e in sorted(entries, key=lambda e: e.seq) if e.path not in keep]
