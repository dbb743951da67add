"""Automatic plots, rendered by the agent with matplotlib (Agg) from the local store: loss curves (train and
validation), accuracy curves, loss on a log scale, and the overfitting indicator (validation − training loss).

``render_plots`` is the whole job for one run (also behind `flightlog plot`); ``PlotService`` is the agent
task that calls it when a run ends (``monitoring.create_plots``) and every ``plot_every_minutes``, then emits
each PNG as an ``Image`` event for the sinks.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import re
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from flightlog.proto.config import MonitoringConfig, decode_config
from flightlog.proto.errors import FlightlogError
from flightlog.proto.events import Event, Image
from flightlog.proto.names import check_run_id
from flightlog.proto.osutil import PRIVATE_FILE_MODE, make_dirs
from flightlog.proto.paths import AgentPaths

from .grid import sleep_on_grid
from .store import Store

__all__ = ["render_plots", "classify", "pair_train_val", "PlotService", "SIZE_PX", "DPI"]

log = logging.getLogger("flightlog.agent")

SIZE_PX = (800, 500)
DPI = 100
_MAX_POINTS = 5000  # per curve: more does not show, and costs render time
_MAX_IMAGE_BYTES = 2 << 20  # PNGs larger than this travel by path only
_SETTLE_SECONDS = 15.0  # after producers came or went, the store is looked at on every change for this long
_QUIET_SECONDS = 30.0  # otherwise at most this often (periodic plots are minutes apart; a RunEnd over the socket)
_BACKFILL_SECONDS = 24 * 3600  # at start, runs that ended longer ago than this are not rendered
_IGNORED_PREFIXES = ("system/", "progress/", "grad_norm/", "memory/", "data/")
_SPLIT = re.compile(r"(?:^|(?<=[/_.\-]))(val|valid|validation|eval|evaluation|test|dev|train|training)(?=$|[/_.\-])",
                    re.I)
_VAL = {"val", "valid", "validation", "eval", "evaluation", "test", "dev"}


# --- which metrics go where (sans-IO) -------------------------------------------------------------------


def _split_of(key: str) -> tuple[str, str]:
    """("train" | "val", the key without its split word): ``val/loss`` → ("val", "loss")."""
    m = _SPLIT.search(key)
    if m is None:
        return "train", key
    split = "val" if m.group(1).lower() in _VAL else "train"
    base = (key[: m.start()] + key[m.end():]).strip("/_.-")
    base = re.sub(r"[/_.\-]{2,}", lambda x: x.group(0)[0], base)
    return split, base or key


def classify(keys: list[str]) -> dict[str, list[str]]:
    """{"loss": [...], "accuracy": [...]} among a run's metric keys (system and progress metrics ignored)."""
    out: dict[str, list[str]] = {"loss": [], "accuracy": []}
    for key in sorted(keys):
        if key.startswith(_IGNORED_PREFIXES):
            continue
        low = key.lower()
        if "loss" in low:
            out["loss"].append(key)
        elif re.search(r"(?:^|[/_.\-])acc(?:uracy)?(?:$|[/_.\-@0-9])", low) or low.endswith("accuracy"):
            out["accuracy"].append(key)
    return out


def pair_train_val(loss_keys: list[str]) -> list[tuple[str, str]]:
    """(train key, validation key) pairs of the same loss: ``train/loss`` or ``loss`` with ``val/loss``."""
    train: dict[str, str] = {}
    val: dict[str, str] = {}
    for key in loss_keys:
        split, base = _split_of(key)
        (val if split == "val" else train).setdefault(base, key)
    return [(train[b], val[b]) for b in sorted(val) if b in train]


# --- reading --------------------------------------------------------------------------------------------


def _read_series(store: Store, run_id: str, keys: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    out = {}
    for key in keys:
        rows = store.metric_series(run_id, key)
        if len(rows) > _MAX_POINTS:
            stride = -(-len(rows) // _MAX_POINTS)
            rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
        if rows:
            out[key] = ([s for s, _ in rows], [v for _, v in rows])
    return out


# --- drawing --------------------------------------------------------------------------------------------


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display; harmless if the process already chose Agg
    from matplotlib.figure import Figure

    if "IPython" in sys.modules:
        # A new canvas reads IPython's version when IPython is loaded: if a sink's thread is importing it
        # right now (mlflow does), this import waits for it to finish, where the canvas would find a
        # half-made module and fail (it did: a run's plots were lost in a full test run).
        importlib.import_module("IPython")
    fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _curves(ax: Any, series: Mapping[str, tuple[list[int], list[float]]], *, positive_only: bool = False) -> int:
    drawn = 0
    for key, (steps, values) in series.items():
        if positive_only:
            pts = [(s, v) for s, v in zip(steps, values) if v > 0]
            if not pts:
                continue
            steps, values = [p[0] for p in pts], [p[1] for p in pts]
        is_val = _split_of(key)[0] == "val"
        ax.plot(steps, values, label=key, linestyle="--" if is_val else "-",
                marker="o" if is_val and len(steps) <= 50 else None, markersize=3)
        drawn += 1
    if drawn:
        ax.legend(loc="best", fontsize=8)
    return drawn


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    with open(fd, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, metadata={"Software": None})
    os.replace(tmp, path)  # a sink or a reader never sees half a PNG
    return path


def _interp(x: list[int], xs: list[int], ys: list[float]) -> list[float]:
    import numpy as np

    return list(np.interp(np.asarray(x, dtype=float), np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)))


def render_plots(store: Store | str | os.PathLike[str], run_id: str, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Render a run's plots from the local store (an open Store, or its path: opened read-only for the
    call) into ``out_dir`` (created); returns the PNGs written.

    ``loss.png``, ``loss_log.png`` (learning curves, log scale), ``accuracy.png`` and ``overfitting.png``
    (validation − training loss at the validation steps), each ``SIZE_PX`` pixels; a plot without data is
    not drawn.
    """
    if not isinstance(store, Store):
        with Store(store, readonly=True) as opened:
            return render_plots(opened, run_id, out_dir)
    groups = classify(store.metric_keys(run_id))
    series = _read_series(store, run_id, groups["loss"] + groups["accuracy"])
    loss = {k: series[k] for k in groups["loss"] if k in series}
    acc = {k: series[k] for k in groups["accuracy"] if k in series}
    out = Path(out_dir)
    make_dirs(out)
    written: list[Path] = []
    if loss:
        fig, ax = _figure(f"loss — run {run_id}", "loss")
        _curves(ax, loss)
        written.append(_save(fig, out / "loss.png"))
        fig, ax = _figure(f"learning curves (log scale) — run {run_id}", "loss (log)")
        if _curves(ax, loss, positive_only=True):
            ax.set_yscale("log")
            written.append(_save(fig, out / "loss_log.png"))
    if acc:
        fig, ax = _figure(f"accuracy — run {run_id}", "accuracy")
        _curves(ax, acc)
        written.append(_save(fig, out / "accuracy.png"))
    pairs = [(t, v) for t, v in pair_train_val(list(loss)) if t in loss and v in loss]
    if pairs:
        fig, ax = _figure(f"overfitting indicator: validation − training loss — run {run_id}", "gap")
        ax.axhline(0.0, color="black", linewidth=0.8)
        for train_key, val_key in pairs:
            vs, vv = loss[val_key]
            ts, tv = loss[train_key]
            gap = [v - t for v, t in zip(vv, _interp(vs, ts, tv))]
            ax.plot(vs, gap, marker="o" if len(vs) <= 50 else None, markersize=3,
                    label=f"{val_key} − {train_key}")
            ax.fill_between(vs, gap, 0.0, where=[g > 0 for g in gap], color="tab:red", alpha=0.15,
                            interpolate=True)
        ax.legend(loc="best", fontsize=8)
        written.append(_save(fig, out / "overfitting.png"))
    return written


# --- the agent task -------------------------------------------------------------------------------------


class PlotService:
    """Renders plots at run end and every ``monitoring.plot_every_minutes``, into
    ``<data dir>/runs/<run id>/plots/``, and emits each as an ``Image`` event.

    Reads the store through one long-lived read-only Store, from its worker threads: ``tick`` and
    ``pending`` may run at once (the Store's lock keeps them apart on the connection)."""

    MARKER = ".rendered"

    def __init__(self, paths: AgentPaths, emit: Callable[[Event], object], *, poll_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, activity: Callable[[], object] | None = None) -> None:
        self.paths = paths
        self.emit = emit
        self.poll_seconds = poll_seconds
        #: What changes when producers come and go (runs end as theirs close): the store is looked at for
        #: runs to plot while it changed lately, else at most every _QUIET_SECONDS (None: at every poll).
        self.activity = activity
        self.clock = clock
        self._done: set[str] = set()  # ended runs already rendered
        self._last: dict[str, float] = {}  # running run -> last periodic render (clock)
        self._rendering = False
        self.rendered = 0
        self._store: Store | None = None
        self._store_lock = threading.Lock()  # tick and pending may both open it
        self._settings: dict[str, MonitoringConfig] = {}  # run -> its monitoring section (a config never changes)

    def plot_dir(self, run_id: str) -> Path:
        """``<data dir>/runs/<run id>/plots``; a ValueError for a run id that is not a plain name."""
        return self.paths.run_dir(run_id) / "plots"

    async def run(self) -> None:
        try:
            seen: tuple[int, ...] | None = None
            key: object = None
            changed = looked = -math.inf
            while True:
                await sleep_on_grid(self.poll_seconds)
                now = self.clock()
                if self.activity is not None and (k := self.activity()) != key:
                    key, changed = k, now
                mark = self._store_mark()
                if mark is not None and mark == seen:
                    continue  # nothing was committed to the store since the last pass: nothing new to plot
                if self.activity is not None and now - changed > _SETTLE_SECONDS and now - looked < _QUIET_SECONDS:
                    continue  # runs log, none ended lately: a look at every run of the store can wait
                try:
                    await anyio.to_thread.run_sync(self.tick)
                    seen, looked = mark, now
                except (sqlite3.Error, FlightlogError, OSError) as exc:
                    log.warning("plots: %s; trying again in %.0f s", exc, self.poll_seconds)
                except Exception:  # a plotting bug must not take the agent down
                    log.exception("plots: rendering failed")
        finally:
            self.close()

    def _store_mark(self) -> tuple[int, ...] | None:
        """Size and time of the store's files (SQLite's WAL changes with every commit); None: no store."""
        mark: list[int] = []
        for path in (self.paths.store, self.paths.store.with_name(self.paths.store.name + "-wal")):
            try:
                st = os.stat(path)
            except OSError:
                if not mark:
                    return None
                continue
            mark += [st.st_mtime_ns, st.st_size, st.st_ino]
        return tuple(mark)

    def close(self) -> None:
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _open_store(self) -> Store | None:
        with self._store_lock:
            if self._store is None and self.paths.store.exists():
                self._store = Store(self.paths.store, readonly=True)
            return self._store

    def _runs(self) -> list[tuple[str, str, float | None]]:
        """(run id, status, ended at) of every run in the store."""
        store = self._open_store()
        if store is None:
            return []
        rows: list[tuple[str, str, float | None]] = []
        for r in store.run_states():
            try:
                check_run_id(r.run_id)
            except ValueError:
                continue  # no SDK sends such an id; as a path it could leave the data dir: no plots for it
            rows.append((r.run_id, r.status, r.ended_at))
        return rows

    def _monitoring(self, run_id: str) -> MonitoringConfig:
        mon = self._settings.get(run_id)
        if mon is None:
            store = self._open_store()
            config, problems = decode_config(store.run_config(run_id) if store else {})
            for problem in problems:
                log.info("plots: run %s: config %s", run_id, problem)
            mon = self._settings[run_id] = config.monitoring
        return mon

    def _final_due(self, run_id: str, ended_at: Any) -> bool:
        """Whether an ended run still needs its final plots (settling the ones that do not)."""
        if ended_at is not None and time.time() - float(ended_at) > _BACKFILL_SECONDS:
            self._done.add(run_id)  # old runs of a store this agent inherited: `flightlog plot` them
            return False
        marker = self.plot_dir(run_id) / self.MARKER
        if marker.exists() and marker.read_text().strip() == repr(ended_at):
            self._done.add(run_id)  # rendered by an earlier agent
            return False
        return True

    def pending(self) -> bool:
        """True while plots render, or while an ended run's final plots are still to come (a sidecar
        waits for them before it exits)."""
        if self._rendering:
            return True
        try:
            rows = self._runs()
            return any(run_id not in self._done and status != "running"
                       and self._monitoring(run_id).create_plots
                       and self._final_due(run_id, ended_at)
                       for run_id, status, ended_at in rows)
        except (sqlite3.Error, FlightlogError):
            return False

    def tick(self) -> int:
        """Render what is due; returns the number of runs rendered."""
        self._rendering = True
        try:
            return self._tick()
        finally:
            self._rendering = False

    def _tick(self) -> int:
        rows = self._runs()
        n = 0
        now = self.clock()
        for run_id, status, ended_at in rows:
            if run_id in self._done:
                continue
            mon = self._monitoring(run_id)
            if not mon.create_plots:
                self._done.add(run_id)
                continue
            if status != "running":
                if not self._final_due(run_id, ended_at):
                    continue
                try:
                    self._render(run_id, ended_at)
                except (sqlite3.Error, OSError):
                    raise  # passing trouble (a busy store, a full disk): the next tick tries again
                except Exception:  # a plotting bug: give up on this run rather than hold the agent
                    log.exception("plots: rendering run %s failed; `flightlog plot` can retry", run_id)
                    self._done.add(run_id)
                    continue
                marker = self.plot_dir(run_id) / self.MARKER
                make_dirs(marker.parent)
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
                with open(fd, "w") as f:
                    f.write(repr(ended_at))
                self._done.add(run_id)
                self._last.pop(run_id, None)
                n += 1
                continue
            every = mon.plot_every_minutes * 60
            if every > 0:
                last = self._last.setdefault(run_id, now)
                if now - last >= every:
                    self._render(run_id, None)
                    self._last[run_id] = now
                    n += 1
        return n

    def _render(self, run_id: str, ended_at: float | None) -> list[Path]:
        store = self._open_store()
        if store is None:
            return []
        paths = render_plots(store, run_id, self.plot_dir(run_id))
        step = store.last_step(run_id) or 0
        ts = time.time()
        for path in paths:
            data = path.read_bytes()
            self.emit(Image(run_id, f"plots/{path.stem}", step, ts, str(path),
                            data if len(data) <= _MAX_IMAGE_BYTES else b"",
                            "final" if ended_at is not None else "periodic"))
        self.rendered += 1
        log.info("plots: %d for run %s in %s", len(paths), run_id, self.plot_dir(run_id))
        return paths

