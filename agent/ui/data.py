"""What the web UI shows, as plain data: metric arrays through the Store's API, the runs table filtered and
sorted, chart series on one shared axis, a run's details and checkpoints, and the diff of two runs."""
from __future__ import annotations

import datetime
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from flightlog.agent.store import Store
from flightlog.agent.ui.envelope import Envelope, ema, envelope, line_points, shared_range
from flightlog.agent.ui.queries import RunRow, artifacts
from flightlog.proto.errors import CheckpointError, FlightlogError

__all__ = ["Arrays", "metric_arrays", "RunFilter", "filter_runs", "sort_runs", "SORT_KEYS", "Series",
           "when", "runs_columns", "chart_series", "chart_records", "flatten", "diff_runs", "run_details", "checkpoints",
           "verify_checkpoint"]

Arrays = tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]

#: Columns the runs table sorts by.
SORT_KEYS = ("created_at", "name", "status", "host", "config_hash", "ended_at")


def metric_arrays(store: Store, run_id: str, key: str, rank: int | None = None) -> Arrays:
    """(steps, timestamps, values) of one metric, in the store's order: ``Store.metric_arrays`` where the
    store has it (the columnar layout), else read from ``Store.metric_points`` (one row per point).
    NaN and infinities are kept (the envelope leaves them out and counts them)."""
    fast = getattr(store, "metric_arrays", None)
    if fast is not None:
        steps, ts, values = fast(run_id, key, rank=rank)
        return (np.asarray(steps, dtype=np.int64), np.asarray(ts, dtype=np.float64),
                np.asarray(values, dtype=np.float64))
    rows = [(p["step"], p["timestamp"], p["value"]) for p in store.metric_points(run_id, key)
            if rank is None or p["rank"] == rank]
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64)
    steps_l, ts_l, values_l = zip(*rows)
    # metric_points writes NaN and infinities as "NaN"/"Infinity"/"-Infinity", which float() reads back
    return (np.asarray(steps_l, dtype=np.int64), np.asarray(ts_l, dtype=np.float64),
            np.asarray([float(v) for v in values_l], dtype=np.float64))


class RunFilter(NamedTuple):
    """Each field: a case-insensitive substring the run's field must hold ('' matches every run)."""

    name: str = ""
    tag: str = ""
    status: str = ""
    config_hash: str = ""
    host: str = ""


def filter_runs(rows: Iterable[RunRow], f: RunFilter) -> list[RunRow]:
    """The rows that match every field of ``f`` (a tag matches if any of the run's tags holds it)."""
    name, tag, status, chash, host = (s.strip().lower() for s in f)
    out = []
    for r in rows:
        if name and name not in r.name.lower() and name not in r.run_id.lower():
            continue
        if tag and not any(tag in t.lower() for t in r.tags):
            continue
        if (status and status != r.status.lower()) or (chash and chash not in r.config_hash.lower()) \
                or (host and host not in r.host.lower()):
            continue
        out.append(r)
    return out


def sort_runs(rows: list[RunRow], key: str = "created_at", descending: bool = True) -> list[RunRow]:
    if key not in SORT_KEYS:
        raise FlightlogError(f"cannot sort runs by {key!r}; one of {', '.join(SORT_KEYS)}")

    def k(r: RunRow) -> Any:
        v = getattr(r, key)
        return (v is not None, v if v is not None else 0)

    return sorted(rows, key=k, reverse=descending)


def when(ts: float | None) -> str:
    """A timestamp as local date and time to the second ('' for none)."""
    return "" if not ts else datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def runs_columns(rows: list[RunRow]) -> dict[str, list[str]]:
    """The runs table as the page shows it: one list per column."""
    return {"run_id": [r.run_id for r in rows], "name": [r.name for r in rows],
            "status": [r.status for r in rows], "created": [when(r.created_at) for r in rows],
            "ended": [when(r.ended_at) for r in rows], "config_hash": [r.config_hash for r in rows],
            "host": [r.host for r in rows], "tags": [", ".join(r.tags) for r in rows],
            "notes": [r.notes for r in rows]}


class Series(NamedTuple):
    """One run's curve of one key, ready to draw: the envelope on the shared axis, and its smoothed mean."""

    run_id: str
    label: str
    env: Envelope
    smoothed: npt.NDArray[np.float64]
    points: int  # points read from the store


def chart_series(store: Store, runs: list[tuple[str, str]], key: str, *, axis: str = "step",
                 columns: int = 800, smoothing: float = 0.0, log_y: bool = False) -> list[Series]:
    """``key`` of each (run id, label), reduced to ``columns`` on one x range shared by all (``axis``:
    "step", "time" in seconds since each run's first point, or "wall" time); ``log_y`` leaves out values
    <= 0, which a log scale cannot draw."""
    if axis not in ("step", "time", "wall"):
        raise FlightlogError(f"unknown chart axis {axis!r}; one of step, time, wall")
    read = []
    for run_id, label in runs:
        steps, ts, values = metric_arrays(store, run_id, key)
        x = steps.astype(np.float64) if axis == "step" else ts - (ts.min() if axis == "time" and ts.size else 0.0)
        if log_y:
            values = np.where(values > 0, values, np.nan)
        read.append((run_id, label, x, values))
    span = shared_range([x for _, _, x, _ in read])
    out = []
    for run_id, label, x, values in read:
        env = envelope(x, values, columns, span)
        out.append(Series(run_id, label, env, ema(env.mean, smoothing), int(values.shape[0])))
    return out


def chart_records(series: list[Series]) -> list[dict[str, Any]]:
    """Rows for the chart: per run, the line through each column's extremes ("value"), the band
    ("lo", "hi", at the column's middle) and the smoothed mean ("smoothed")."""
    rows: list[dict[str, Any]] = []
    for s in series:
        xs, ys = line_points(s.env)
        rows.extend({"run": s.label, "x": float(x), "value": float(y), "layer": "envelope"}
                    for x, y in zip(xs.tolist(), ys.tolist()))
        mid = (s.env.left + s.env.right) / 2
        rows.extend({"run": s.label, "x": float(m), "lo": float(lo), "hi": float(hi), "smoothed": float(sm),
                     "layer": "band"}
                    for m, lo, hi, sm in zip(mid.tolist(), s.env.lo.tolist(), s.env.hi.tolist(),
                                             s.smoothed.tolist()))
    return rows


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config as comparable keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _same(a: Any, b: Any) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or (type(a) is type(b) and a == b)


def diff_runs(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) of every flattened key the two differ in (absent: None), sorted by key."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
            if k not in fa or k not in fb or not _same(fa[k], fb[k])]


def run_details(store: Store, run_id: str) -> dict[str, Any]:
    """A run page's data: the run's row, hyper-parameters, config, metadata (environment, git, command),
    ranks, metric keys (training and system), artifacts, and the uncommitted git diff if it was saved."""
    run = store.run(run_id)
    meta = store.run_metadata(run_id)
    keys = sorted(store.metric_keys(run_id))
    arts = artifacts(store, run_id)
    return {"run": {k: v for k, v in run.items() if k not in ("config", "metadata", "params")},
            "params": run.get("params", {}), "config": store.run_config(run_id), "metadata": meta,
            "ranks": store.rank_table(run_id), "metric_keys": [k for k in keys if not k.startswith("system/")],
            "system_keys": [k for k in keys if k.startswith("system/")], "artifacts": arts,
            "git_diff": _git_diff(meta, arts)}


def _git_diff(meta: dict[str, Any], arts: list[dict[str, Any]]) -> str:
    git = meta.get("git") if isinstance(meta.get("git"), dict) else {}
    path = (git or {}).get("diff_artifact") or next((a["path"] for a in arts if a["kind"] == "git-diff"), None)
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")  # the first MiB: a page, not a download
    except OSError as exc:
        return f"(the diff {path} cannot be read: {exc.strerror or exc})"


def checkpoints(store_path: Path, run_id: str) -> list[dict[str, Any]]:
    """The run's checkpoints in the agent's registry (every state: writing, done, failed), oldest first."""
    from flightlog.proto.checkpoint.registry import Registry

    try:
        with Registry(store_path, readonly=True) as reg:
            return reg.entries(None, ("writing", "done", "failed", "interrupted"), run_id=run_id)
    except CheckpointError:
        return []


def verify_checkpoint(path: str, checksum: str | None) -> str:
    """"ok", or why the file is not a sound checkpoint (the reader's full check: trailer, checksum, bounds)."""
    from flightlog.proto.checkpoint.reader import verify_file

    try:
        verify_file(path, checksum, deep=True)
    except CheckpointError as exc:
        return str(exc)
    return "ok"
