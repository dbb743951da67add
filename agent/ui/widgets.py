"""Streamlit pieces the pages share: the store for this page run, the chart panel (envelope chart, its data,
axis/smoothing/log controls), small tables. Thin: the logic is in ``data``, ``charts`` and ``queries``."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from flightlog.agent.store import Store
from flightlog.agent.ui import charts, data
from flightlog.agent.ui.data import when
from flightlog.proto.paths import AgentPaths, resolve_paths

__all__ = ["PAGES", "agent_paths", "open_store", "chart_panel", "chart_controls", "when", "table"]

#: The app's pages by name, set by ``app.main`` on each page run (``st.switch_page`` wants the Page).
PAGES: dict[str, Any] = {}


def agent_paths() -> AgentPaths:
    """The data directory and socket `flightlog ui` was started for (the script's arguments)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data-dir")
    p.add_argument("--socket")
    args, _ = p.parse_known_args(sys.argv[1:])
    return resolve_paths(args.data_dir, args.socket)


@contextmanager
def open_store(*, write: bool = False) -> Iterator[Store]:
    """A Store of this page run only (one thread): read-only, or writable for an edit."""
    store = Store(agent_paths().store, readonly=not write)
    try:
        yield store
    finally:
        store.close()


def table(rows: list[dict[str, Any]], **kwargs: Any) -> None:
    """A small table (st.table: plain HTML, every cell in the page), every value shown as text."""
    if rows:
        st.table({k: [_cell(r.get(k)) for r in rows] for k in rows[0]}, **kwargs)
    else:
        st.caption("none")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)


def chart_controls(prefix: str) -> tuple[str, float, bool]:
    """Axis, smoothing and log-scale controls, keyed by ``prefix`` (each chart panel its own)."""
    c1, c2, c3 = st.columns([2, 2, 1])
    axis = c1.radio("x axis", ["step", "time", "wall"], horizontal=True, key=f"{prefix}-axis",
                    help="step; seconds since each run's first point; wall-clock time")
    smoothing = c2.slider("smoothing", 0.0, 0.99, 0.0, 0.01, key=f"{prefix}-smooth")
    log_y = c3.checkbox("log scale", key=f"{prefix}-log")
    return str(axis), float(smoothing), bool(log_y)


def chart_panel(store: Store, runs: list[tuple[str, str]], keys: list[str], prefix: str,
                columns: int = 800, first: int = 6) -> None:
    """One chart per chosen key (the first ``first`` until the user picks), overlaying ``runs`` (id, label)
    on a shared axis, each drawn from the server-side envelope; under each, its data (per column) as JSON."""
    if not keys:
        st.caption("no metrics")
        return
    chosen = st.multiselect("metrics", keys, default=keys[:first], key=f"{prefix}-keys")
    axis, smoothing, log_y = chart_controls(prefix)
    for key in chosen:
        series = data.chart_series(store, runs, key, axis=axis, columns=columns, smoothing=smoothing,
                                   log_y=log_y)
        spec = charts.metric_spec(key, data.chart_records(series), axis=axis, log_y=log_y, smoothing=smoothing)
        st.vega_lite_chart(spec, width="stretch")
        shown = ", ".join(f"{s.label}: {s.points:,} points in {s.env.columns} columns" for s in series)
        with st.expander(f"chart data: {key} ({shown})"):
            st.code(json.dumps(charts.exposed_data(key, axis, series)), language="json")
