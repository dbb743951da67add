"""Visualisation helpers: gradient norms and flow plot, histograms, model summary, data distribution; and
their events through a real agent's WAL."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_capture import wal_events  # noqa: E402

import flightlog
from flightlog import viz
from flightlog.proto.events import Histogram, HyperParams, Image, Metrics, Text  # noqa: E402


def small_model() -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(16, 4)), torch.nn.Softmax(-1)
    )
    model[2][0].bias.requires_grad_(False)
    x = torch.randn(32, 8)
    model(x).pow(2).sum().backward()
    return model


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_gradient_norms_match_torch() -> None:
    model = small_model()
    norms = viz.gradient_norms(model)
    expected = {f"grad_norm/{n}": float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}
    assert "grad_norm/2.0.bias" not in norms  # frozen: no gradient
    total = norms.pop("grad_norm/total")
    assert norms == pytest.approx(expected)
    assert total == pytest.approx(sum(v * v for v in expected.values()) ** 0.5)
    assert viz.gradient_norms(torch.nn.Linear(2, 2)) == {}  # no backward yet


def test_gradient_flow_png() -> None:
    png = viz.gradient_flow_png(small_model(), width_px=640, height_px=480)
    assert png is not None and png_size(png) == (640, 480)
    assert viz.gradient_flow_png(torch.nn.Linear(2, 2)) is None


def test_histogram_counts_and_stats() -> None:
    t = torch.tensor([0.0, 1.0, 1.0, 2.0, float("nan"), float("inf")])
    h = viz.histogram(t, bins=4)
    assert h is not None
    assert sum(h.bucket_counts) == h.count == 4  # non-finite values left out
    assert (h.min, h.max, h.sum, h.sum_squares) == (0.0, 2.0, 4.0, 6.0)
    assert h.bucket_limits[-1] == pytest.approx(2.0) and len(h.bucket_limits) == 4
    assert h.extra["mean"] == 1.0
    labels = viz.histogram(torch.tensor([0, 1, 1, 3, 3, 3]))  # integers: one bucket per value
    assert labels is not None and labels.bucket_counts == [1.0, 2.0, 0.0, 3.0]
    assert viz.histogram(torch.tensor([float("nan")])) is None
    const = viz.histogram(torch.full((10,), 5.0), bins=8)
    assert const is not None and sum(const.bucket_counts) == 10


def test_parameter_histograms_and_data_distribution() -> None:
    import numpy as np

    model = small_model()
    keys = [k for k, _ in viz.parameter_histograms(model, bins=16)]
    assert "weights/0.weight" in keys and "gradients/0.weight" in keys
    assert "weights/2.0.bias" in keys and "gradients/2.0.bias" not in keys
    batch = {"image": torch.rand(4, 3, 8, 8), "label": torch.tensor([0, 1, 1, 2]),
             "extra": [np.arange(10.0), "not a tensor"]}
    hists = dict(viz.data_distribution(batch))
    assert set(hists) == {"data/image", "data/label", "data/extra/0"}
    assert hists["data/image"].count == 4 * 3 * 8 * 8
    assert hists["data/extra/0"].extra["mean"] == pytest.approx(4.5)


def test_model_summary_counts() -> None:
    model = small_model()
    text, counts = viz.model_summary(model)
    assert counts["parameters"] == sum(p.numel() for p in model.parameters()) == 8 * 16 + 16 + 16 * 4 + 4
    assert counts["trainable_parameters"] == counts["parameters"] - 4
    for line in ("0", "Linear", "2.0", "Softmax", "total parameters: 212"):
        assert line in text


def test_viz_does_not_import_torch_until_used() -> None:
    code = "import sys, flightlog, flightlog.viz, flightlog.capture; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tracker_visualisation_events(agent: Any, base_config: dict, tmp_path: Path) -> None:
    model = small_model()
    with flightlog.ExperimentTracker("viz", base_config) as t:
        t.log_metrics({"loss": 1.0}, step=5)
        norms = t.log_gradient_flow(model)
        n = t.log_histograms(model, step=7, bins=8)
        m = t.log_data_distribution({"x": torch.randn(16, 3)}, bins=8)
        text = t.log_model_summary(model)
        t.log_metrics({"loss": 0.5})  # the helpers did not move the step
    events = wal_events(agent.paths.wal_dir)
    grad = [e for e in events if isinstance(e, Metrics) and "grad_norm/total" in e.values]
    assert len(grad) == 1 and grad[0].step == 5 and grad[0].values == pytest.approx(norms)
    img = next(e for e in events if isinstance(e, Image))
    assert img.key == "gradient_flow" and img.step == 5 and png_size(img.data) == (1000, 600)
    hists = [e for e in events if isinstance(e, Histogram)]
    assert len(hists) == n + m and m == 1
    w = next(h for h in hists if h.key == "weights/0.weight")
    assert w.step == 7 and sum(w.bucket_counts) == 8 * 16 and len(w.bucket_limits) == 8
    assert next(h for h in hists if h.key == "data/x").count == 48
    assert any(isinstance(e, Metrics) and "data/x/mean" in e.values for e in events)
    summary = next(e for e in events if isinstance(e, Text) and e.key == "model/summary")
    assert summary.text == text
    assert any(isinstance(e, HyperParams) and e.params.get("model/parameters") == 212 for e in events)
    losses = [e.step for e in events if isinstance(e, Metrics) and "loss" in e.values]
    assert losses == [5, 6]
