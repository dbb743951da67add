"""The chart envelope: a series reduced to one min/max pair per pixel column, so a chart of a million points
draws every spike (a reservoir sample, as TensorBoard keeps, drops them). Pure functions over numpy arrays."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["Envelope", "envelope", "shared_range", "line_points", "ema"]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


class Envelope(NamedTuple):
    """Per pixel column that holds points (empty columns are left out), in x order."""

    left: Floats  # the column's first x
    right: Floats  # the column's last x
    lo: Floats  # the least value in the column
    hi: Floats  # the greatest
    lo_x: Floats  # where the least value is (its first occurrence)
    hi_x: Floats  # where the greatest is
    mean: Floats
    counts: Ints  # finite points in the column
    dropped: int  # points left out: NaN or infinite value or x, or outside the range asked for

    @property
    def columns(self) -> int:
        """The columns that hold points."""
        return int(self.lo.shape[0])


def _empty(dropped: int) -> Envelope:
    f = np.empty(0, dtype=np.float64)
    return Envelope(f, f, f, f, f, f, f, np.empty(0, dtype=np.int64), dropped)


def shared_range(xs: list[npt.ArrayLike]) -> tuple[float, float] | None:
    """The x range covering every series (finite x only): the one axis several runs are drawn on."""
    lo, hi = np.inf, -np.inf
    for x in xs:
        a = np.asarray(x, dtype=np.float64)
        a = a[np.isfinite(a)]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return None if lo > hi else (lo, hi)


def envelope(x: npt.ArrayLike, y: npt.ArrayLike, columns: int,
             x_range: tuple[float, float] | None = None) -> Envelope:
    """Bucket the points (x, y) into ``columns`` equal slices of ``x_range`` (default: the data's) and keep,
    per slice, the least and greatest value with where they are, the mean and the count. Vectorised: a
    million points take tens of milliseconds."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, not {columns}")
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-d and of one length, not {xa.shape} and {ya.shape}")
    keep = np.isfinite(xa) & np.isfinite(ya)
    if x_range is not None:
        keep &= (xa >= x_range[0]) & (xa <= x_range[1])
    total = int(xa.shape[0])
    if not keep.all():
        xa, ya = xa[keep], ya[keep]
    n = int(xa.shape[0])
    if n == 0:
        return _empty(total)
    if n > 1 and bool(np.any(xa[1:] < xa[:-1])):  # steps arrive in order; out of order only after a resume
        order = np.argsort(xa, kind="stable")
        xa, ya = xa[order], ya[order]
    x0, x1 = (float(xa[0]), float(xa[-1])) if x_range is None else (float(x_range[0]), float(x_range[1]))
    if x1 > x0:
        col = ((xa - x0) * (columns / (x1 - x0))).astype(np.int64)
        np.clip(col, 0, columns - 1, out=col)
    else:
        col = np.zeros(n, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], col[1:] != col[:-1])))
    counts = np.diff(np.append(starts, n)).astype(np.int64)
    lo = np.minimum.reduceat(ya, starts)
    hi = np.maximum.reduceat(ya, starts)
    mean = np.add.reduceat(ya, starts) / counts
    group = np.repeat(np.arange(starts.shape[0]), counts)
    return Envelope(xa[starts], xa[starts + counts - 1], lo, hi, xa[_first_where(ya == lo[group], group)],
                    xa[_first_where(ya == hi[group], group)], mean, counts, total - n)


def _first_where(mask: npt.NDArray[np.bool_], group: Ints) -> Ints:
    """Per group (groups are contiguous and each has a True), the index of its first True."""
    idx = np.flatnonzero(mask)
    g = group[idx]
    return idx[np.concatenate(([True], g[1:] != g[:-1]))]


def line_points(env: Envelope) -> tuple[Floats, Floats]:
    """A line through every column's least and greatest value, in x order (one point where they are one):
    drawn as a line, it reaches every spike of the series."""
    first_lo = env.lo_x <= env.hi_x
    xs = np.column_stack((np.where(first_lo, env.lo_x, env.hi_x), np.where(first_lo, env.hi_x, env.lo_x)))
    ys = np.column_stack((np.where(first_lo, env.lo, env.hi), np.where(first_lo, env.hi, env.lo)))
    single = (env.lo_x == env.hi_x) & (env.lo == env.hi)
    take = np.column_stack((np.ones_like(single), ~single)).ravel()
    return xs.ravel()[take], ys.ravel()[take]


def ema(values: npt.ArrayLike, weight: float) -> Floats:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start (weight 0: none)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), not {weight}")
    v = np.asarray(values, dtype=np.float64)
    out = np.empty_like(v)
    last = 0.0
    for i, value in enumerate(v.tolist()):  # once per drawn column, not per point: a short loop
        last = last * weight + (1.0 - weight) * value
        out[i] = last / (1.0 - weight ** (i + 1))
    return out
