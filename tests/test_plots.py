"""Automatic plots: which metrics go where, PNGs of the expected size that change with the data, the agent
rendering them at run end (and emitting Image events), and `flightlog plot`."""
from __future__ import annotations

import math
import struct
import time
from pathlib import Path
from typing import Any

import pytest

import flightlog
from flightlog.agent.cli import main as cli_main
from flightlog.agent.plots import DPI, SIZE_PX, PlotService, classify, pair_train_val, render_plots
from flightlog.agent.store import Store
from flightlog.proto.events import Image, Metrics, RunEnd, RunStart
from flightlog.proto.paths import AgentPaths


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def decoded(path: Path) -> Any:
    """Decode the whole image (a truncated or corrupt PNG raises)."""
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_classify_and_pairs() -> None:
    keys = ["train/loss", "val/loss", "loss_aux", "val_loss_aux", "train/acc", "eval_accuracy", "top5_acc",
            "system/cpu_percent", "progress/eta_seconds", "lr", "grad_norm/total", "accumulate_steps"]
    groups = classify(keys)
    assert groups["loss"] == ["loss_aux", "train/loss", "val/loss", "val_loss_aux"]
    assert groups["accuracy"] == ["eval_accuracy", "top5_acc", "train/acc"]
    assert pair_train_val(groups["loss"]) == [("train/loss", "val/loss"), ("loss_aux", "val_loss_aux")]
    assert pair_train_val(["loss", "validation/loss", "test_loss"]) == [("loss", "validation/loss")]


def fill_store(path: Path, run_id: str, steps: int, *, val_offset: float = 0.2, ended: bool = True,
               config: dict[str, Any] | None = None) -> None:
    store = Store(path)
    events: list[Any] = [RunStart(run_id, "plots", time.time(), config=config or {})]
    for s in range(steps):
        values = {"train/loss": 2.0 * math.exp(-s / 20), "train/acc": 1 - math.exp(-s / 20),
                  "system/cpu_percent": 50.0}
        if s % 10 == 0:
            values.update({"val/loss": 2.0 * math.exp(-s / 20) + val_offset, "val/acc": 0.9 - math.exp(-s / 20)})
        events.append(Metrics(run_id, s, time.time(), values))
    events.append(Metrics(run_id, steps, time.time(), {"train/loss": float("nan")}))
    if ended:
        events.append(RunEnd(run_id, "completed", time.time()))
    store.apply(events)
    store.close()


def test_render_plots_sizes_and_changes(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    fill_store(db, "r1", 100)
    out = tmp_path / "plots"
    paths = render_plots(db, "r1", out)
    assert sorted(p.name for p in paths) == ["accuracy.png", "loss.png", "loss_log.png", "overfitting.png"]
    for p in paths:
        assert p.parent == out and png_size(p) == SIZE_PX
        assert decoded(p).shape[:2] == (SIZE_PX[1], SIZE_PX[0])
    assert not list(out.glob(".*tmp"))
    before = {p.name: p.read_bytes() for p in paths}
    assert {p.name: p.read_bytes() for p in render_plots(db, "r1", out)} == before  # same data, same PNGs

    fill_store(db, "r2", 100, val_offset=0.5)
    out2 = tmp_path / "plots2"
    after = {p.name: p.read_bytes() for p in render_plots(db, "r2", out2)}
    assert set(after) == set(before)
    assert all(after[name] != before[name] for name in after)  # different data (and run id), other pictures

    store = Store(db)  # more points for r1: its loss plot changes
    store.apply([Metrics("r1", 200, time.time(), {"train/loss": 3.0})])
    store.close()
    assert (render_plots(db, "r1", out)[0]).read_bytes() != before["loss.png"]


def test_render_plots_without_curves(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = Store(db)
    store.apply([RunStart("r", "x", 0.0), Metrics("r", 0, 0.0, {"lr": 0.1, "system/cpu_percent": 3.0})])
    store.close()
    assert render_plots(db, "r", tmp_path / "out") == []


def make_paths(tmp_path: Path) -> AgentPaths:
    data = tmp_path / "data"
    data.mkdir()
    return AgentPaths(data_dir=data, socket=tmp_path / "a.sock", ring_dir=tmp_path / "r", spill_dir=data / "s")


def test_plot_service_renders_at_end_once_and_emits_images(tmp_path: Path) -> None:
    paths = make_paths(tmp_path)
    fill_store(paths.store, "done", 50)
    fill_store(paths.store, "noplots", 50, config={"monitoring": {"create_plots": False}})
    fill_store(paths.store, "live", 50, ended=False, config={"monitoring": {"plot_every_minutes": 1}})
    events: list[Any] = []
    clock = [0.0]
    svc = PlotService(paths, events.append, clock=lambda: clock[0])
    assert svc.tick() == 1
    images = [e for e in events if isinstance(e, Image)]
    assert {e.run_id for e in images} == {"done"}
    assert sorted(e.key for e in images) == ["plots/accuracy", "plots/loss", "plots/loss_log", "plots/overfitting"]
    for e in images:
        assert e.step == 50 and e.caption == "final"
        assert Path(e.path).read_bytes() == e.data and Path(e.path).parent == svc.plot_dir("done")
    assert not svc.plot_dir("noplots").exists()
    assert svc.tick() == 0  # rendered once
    clock[0] += 61
    assert svc.tick() == 1  # the live run's periodic plots
    assert {e.caption for e in events if isinstance(e, Image) and e.run_id == "live"} == {"periodic"}
    svc.close()
    # a new agent over the same data directory does not render "done" again
    again = PlotService(paths, events.append)
    assert again.tick() == 0
    again.close()


def test_agent_renders_plots_at_run_end_and_cli_renders_on_demand(
        agent: Any, base_config: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with flightlog.ExperimentTracker("curves", base_config) as t:
        for s in range(30):
            t.log_metrics({"train/loss": 1 / (s + 1)}, step=s)
            if s % 5 == 0:
                t.log_metrics({"val/loss": 1.5 / (s + 1)}, step=s)
    plot_dir = agent.paths.data_dir / "runs" / t.run_id / "plots"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (plot_dir / ".rendered").exists():
        time.sleep(0.1)
    assert sorted(p.name for p in plot_dir.glob("*.png")) == ["loss.png", "loss_log.png", "overfitting.png"], \
        agent.read_log()
    assert png_size(plot_dir / "loss.png") == (SIZE_PX[0], SIZE_PX[1]) and DPI == 100

    out = tmp_path / "mine"
    assert cli_main(["plot", t.run_id[:8], "--out", str(out), "--data-dir", str(agent.paths.data_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["loss.png", "loss_log.png", "overfitting.png"]
    assert (out / "loss.png").read_bytes() == (plot_dir / "loss.png").read_bytes()
    assert cli_main(["plot", "no-such-run", "--data-dir", str(agent.paths.data_dir)]) == 1
