"""Vega-Lite specs for the web UI's metric charts, built from ``data.chart_records``: the line through every
pixel column's extremes, the min/max band, and the smoothed mean; one colour per run, log scale on request.
Also the chart's data as the page exposes it (JSON), which the browser test reads back."""
from __future__ import annotations

from typing import Any

from flightlog.agent.ui.data import Series

__all__ = ["metric_spec", "exposed_data", "AXIS_TITLES"]

AXIS_TITLES = {"step": "step", "time": "seconds since the run's first point", "wall": "wall time"}


def metric_spec(key: str, records: list[dict[str, Any]], *, axis: str = "step", log_y: bool = False,
                smoothing: float = 0.0, height: int = 280) -> dict[str, Any]:
    """One chart of ``key`` for several runs on one x axis."""
    x_type = "temporal" if axis == "wall" else "quantitative"
    x: dict[str, Any] = {"field": "x", "type": x_type, "title": AXIS_TITLES.get(axis, axis)}
    if axis == "wall":
        x = {**x, "field": "x_ms"}
        records = [{**r, "x_ms": r["x"] * 1000.0} for r in records]
    y_scale: dict[str, Any] = {"type": "log"} if log_y else {"zero": False}
    color = {"field": "run", "type": "nominal", "title": "run"}
    layers: list[dict[str, Any]] = [
        {"transform": [{"filter": "datum.layer == 'band'"}], "mark": {"type": "area", "opacity": 0.18},
         "encoding": {"x": x, "y": {"field": "lo", "type": "quantitative", "scale": y_scale, "title": key},
                      "y2": {"field": "hi"}, "color": color}},
        {"transform": [{"filter": "datum.layer == 'envelope'"}],
         "mark": {"type": "line", "strokeWidth": 1, "opacity": 0.9 if smoothing == 0 else 0.35},
         "encoding": {"x": x, "y": {"field": "value", "type": "quantitative", "scale": y_scale, "title": key},
                      "color": color,
                      "tooltip": [{"field": "run"}, {"field": "x", "title": axis}, {"field": "value"}]}},
    ]
    if smoothing > 0:
        layers.append({"transform": [{"filter": "datum.layer == 'band'"}], "mark": {"type": "line", "strokeWidth": 2},
                       "encoding": {"x": x, "y": {"field": "smoothed", "type": "quantitative", "scale": y_scale},
                                    "color": color}})
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": key, "height": height,
            "width": "container", "data": {"values": records}, "layer": layers}


def exposed_data(key: str, axis: str, series: list[Series]) -> dict[str, Any]:
    """What a chart draws, per run: points read, points left out (NaN, infinite, <= 0 on a log scale), and
    each pixel column as [first x, last x, min, max, count]."""
    return {"key": key, "axis": axis, "runs": [
        {"run_id": s.run_id, "label": s.label, "points": s.points, "dropped": s.env.dropped,
         "columns": [[a, b, lo, hi, n] for a, b, lo, hi, n in zip(
             s.env.left.tolist(), s.env.right.tolist(), s.env.lo.tolist(), s.env.hi.tolist(),
             s.env.counts.tolist())]}
        for s in series]}
