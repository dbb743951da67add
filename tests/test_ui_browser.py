"""`flightlog ui` in a real browser: the distribution's headless Chromium driven by Playwright, against a data
directory filled by a real agent from real tracker runs. Runs table and filters, a run page whose chart data
is checked against the store, checkpoints verified, two runs compared, tags edited, a run deleted after its
confirmation, the agent page; a screenshot of each. One UI server and one browser for the module."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import AgentProcess
from playwright.sync_api import Browser, Page, expect, sync_playwright

import flightlog
from flightlog.agent.store import Store
from flightlog.agent.ui import data, queries
from flightlog.proto.paths import AgentPaths, resolve_paths

CHROMIUM = "/usr/bin/chromium"
SPIKE_STEP, SPIKE = 1234, 50.0
POINTS = 3000  # more than the chart's 800 columns: the page shows an envelope, not the points


def _make_runs(base: Path) -> dict[str, str]:
    """Three runs through a real tracker and agent; exp0 has a spike and a best checkpoint."""
    import torch

    cfg: dict[str, Any] = {"tracking": {"use_tensorboard": False}, "agent": {"autostart": False},
                           "checkpointing": {"checkpoint_dir": str(base / "ckpt")}}
    ids: dict[str, str] = {}
    for i, (lr, tag) in enumerate([(0.1, "sweep"), (0.01, "sweep"), (0.001, "baseline")]):
        with flightlog.ExperimentTracker(f"exp{i}", {**cfg, "tags": [tag]}) as t:
            t.log_hyperparameters({"lr": lr, "batch_size": 32})
            n = POINTS if i == 0 else 200
            for s in range(n):
                t.log_metrics({"train/loss": 1.0 / (s + 1) + (SPIKE if (i == 0 and s == SPIKE_STEP) else 0.0)},
                              step=s)
            if i == 0:
                t.save_checkpoint({"w": torch.arange(8.0)}, 0, 10, val_loss=2.0).wait()
                t.save_checkpoint({"w": torch.arange(8.0) * 2}, 0, 20, val_loss=1.0, is_best=True).wait()
            ids[f"exp{i}"] = t.run_id
    return ids


def _wait_points(paths: AgentPaths, run_id: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Store(paths.store, readonly=True) as s:
            if data.metric_arrays(s, run_id, "train/loss")[0].shape[0] >= n:
                return
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not reach {n} points in the store in {timeout} s")


def _wait_for_store(paths: AgentPaths, ids: dict[str, str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if paths.store.exists():
            with Store(paths.store, readonly=True) as s:
                ended = {r.run_id for r in s.run_states() if r.status == "completed"}
            if set(ids.values()) <= ended:
                return
        time.sleep(0.2)
    raise AssertionError(f"the agent did not store the runs {ids} in {timeout} s")


def _start_ui(paths: AgentPaths, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flightlog.agent.cli", "ui", "--data-dir", str(paths.data_dir),
                             "--socket", str(paths.socket)], stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"flightlog ui: (http://127\.0\.0\.1:\d+/)", log.read_text())
        if m:
            try:
                with urllib.request.urlopen(m.group(1) + "_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        return proc, m.group(1)
            except OSError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"flightlog ui exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"flightlog ui did not come up: {log.read_text()}")


class UI:
    def __init__(self, url: str, paths: AgentPaths, ids: dict[str, str], shots: Path, browser: Browser,
                 live: flightlog.ExperimentTracker) -> None:
        self.url, self.paths, self.ids, self.shots, self.live = url, paths, ids, shots, live
        self.page: Page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # a shared, slow machine: Streamlit reruns take seconds

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    base = tmp_path_factory.mktemp("ui")
    sock_dir = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLIGHTLOG_DATA_DIR", str(base / "data"))
        mp.setenv("FLIGHTLOG_AGENT_SOCKET", str(sock_dir / "a.sock"))
        (base / "data").mkdir(mode=0o700)
        paths = resolve_paths()
        agent = AgentProcess(paths).start()
        proc = live = None
        try:
            ids = _make_runs(base)
            live = flightlog.ExperimentTracker("live", {"tracking": {"use_tensorboard": False},
                                                        "agent": {"autostart": False}})
            for s in range(10):
                live.log_metrics({"train/loss": float(s)}, step=s)
            _wait_for_store(paths, ids)
            _wait_points(paths, live.run_id, 10)
            proc, url = _start_ui(paths, base / "ui.log")
            shots = base / "screenshots"
            shots.mkdir()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
                try:
                    yield UI(url, paths, ids, shots, browser, live)
                finally:
                    browser.close()
        finally:
            if live is not None:
                live.finish()
            if proc is not None:
                proc.terminate()
                proc.wait(30)
            agent.stop()
            shutil.rmtree(sock_dir, ignore_errors=True)
            shutil.rmtree(paths.ring_dir, ignore_errors=True)


def _png(path: Path) -> None:
    head = path.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000, path


def test_runs_table_filters(ui: UI) -> None:
    page = ui.page
    page.goto(ui.url)
    expect(page.get_by_text("4 of 4 runs")).to_be_visible()
    page.get_by_label("tag").fill("baseline")
    page.get_by_label("tag").press("Enter")
    expect(page.get_by_text("1 of 4 runs")).to_be_visible()
    _png(ui.shot("runs-filtered"))
    page.get_by_label("tag").fill("")
    page.get_by_label("tag").press("Enter")
    expect(page.get_by_text("4 of 4 runs")).to_be_visible()
    _png(ui.shot("runs"))


def _chart_data(page: Page, key: str) -> dict[str, Any]:
    box = page.get_by_test_id("stExpander").filter(has_text=f"chart data: {key}").first
    box.get_by_text(f"chart data: {key}").click()
    return json.loads(box.locator("code").inner_text())  # type: ignore[no-any-return]


def test_run_page_chart_is_the_stores_envelope_and_checkpoints_verify(ui: UI) -> None:
    page, run_id = ui.page, ui.ids["exp0"]
    page.goto(ui.url)
    page.get_by_label("open a run (id, id prefix or name)").fill("exp0")
    page.get_by_role("button", name="Open run").click()
    page.wait_for_url(re.compile(rf"/run\?run={run_id}$"))
    page.get_by_role("tab", name="Metrics").click()
    chart = page.get_by_test_id("stVegaLiteChart").locator("canvas, svg").first
    expect(chart).to_be_visible()
    shown = _chart_data(page, "train/loss")
    (series,) = shown["runs"]
    assert series["run_id"] == run_id and series["points"] == POINTS
    with Store(ui.paths.store, readonly=True) as store:
        steps, _, values = data.metric_arrays(store, run_id, "train/loss")
    cols = np.array(series["columns"], dtype=np.float64)
    assert 100 < len(cols) <= 800 and int(cols[:, 4].sum()) == POINTS  # an envelope of every point
    for left, right, lo, hi, n in cols:
        inside = values[(steps >= left) & (steps <= right)]
        assert (inside.min(), inside.max(), inside.size) == (lo, hi, n)
    assert cols[:, 3].max() == pytest.approx(SPIKE + 1 / (SPIKE_STEP + 1))  # the spike is drawn
    _png(ui.shot("run-metrics"))

    page.get_by_role("tab", name="Checkpoints").click()
    panel = page.get_by_role("tabpanel", name="Checkpoints")
    expect(panel.get_by_text("★ best", exact=True)).to_be_visible()
    panel.get_by_role("button", name="Verify").click()
    expect(panel.get_by_text(re.compile(r"\.safetensors: ok$|: ok$"))).to_be_visible()
    _png(ui.shot("run-checkpoints"))


def test_compare_two_runs(ui: UI) -> None:
    page = ui.page
    page.goto(ui.url)
    page.get_by_label("compare runs (ids, prefixes or names, comma separated)").fill("exp0, exp1")
    page.get_by_role("button", name="Compare runs").click()
    page.wait_for_url(re.compile(r"/compare\?runs="))
    expect(page.get_by_text("Hyper-parameter differences (exp0 vs exp1)")).to_be_visible()
    diff = page.get_by_test_id("stTable").first
    expect(diff).to_contain_text("lr")
    expect(diff).to_contain_text("0.1")
    expect(diff).to_contain_text("0.01")
    assert "batch_size" not in diff.inner_text()  # the same in both: not a difference
    shown = _chart_data(page, "train/loss")
    assert {r["run_id"] for r in shown["runs"]} == {ui.ids["exp0"], ui.ids["exp1"]}
    lefts = [r["columns"][0][0] for r in shown["runs"]]
    assert lefts == [0.0, 0.0]  # one shared step axis
    _png(ui.shot("compare"))


def test_edit_tags_and_delete_a_run(ui: UI) -> None:
    page, run_id = ui.page, ui.ids["exp2"]
    page.goto(f"{ui.url}run?run={run_id}")
    page.get_by_role("tab", name="Edit").click()
    panel = page.get_by_role("tabpanel", name="Edit")
    panel.get_by_label("tags (comma separated; key=value for a key-value tag)").fill("baseline, owner=ui-test")
    panel.get_by_label("notes").fill("checked in the browser")
    panel.get_by_role("button", name="Save tags and notes").click()
    expect(page.get_by_text(f"tags and notes of {run_id} saved")).to_be_visible()
    with Store(ui.paths.store, readonly=True) as store:
        row = next(r for r in queries.runs_table(store) if r.run_id == run_id)
    assert row.tags == ("baseline", "owner=ui-test") and row.notes == "checked in the browser"

    page.get_by_role("button", name="Delete run").click()
    expect(page.get_by_text(f"Delete run exp2 ({run_id}) from the store?")).to_be_visible()
    _png(ui.shot("delete-confirm"))
    with Store(ui.paths.store, readonly=True) as store:  # asking is not deleting
        assert run_id in {r.run_id for r in store.run_states()}
    page.get_by_role("button", name="Yes, delete it").click()
    expect(page.get_by_text(f"run {run_id} deleted")).to_be_visible()
    expect(page.get_by_text("3 of 3 runs")).to_be_visible()
    with Store(ui.paths.store, readonly=True) as store:
        assert run_id not in {r.run_id for r in store.run_states()}
        assert list(store.metric_points(run_id)) == []
    from flightlog.proto.audit import AuditLog  # the UI's deletion is audited like `flightlog runs rm`

    assert [(e.object, e.outcome) for e in AuditLog(ui.paths.data_dir).entries() if e.action == "run.delete"] == \
        [(f"run:{run_id}", "ok")]
    _png(ui.shot("after-delete"))


def test_running_run_refreshes_live_and_cannot_be_deleted(ui: UI) -> None:
    page, live = ui.page, ui.live
    page.goto(f"{ui.url}run?run={live.run_id}")
    page.get_by_role("tab", name="Metrics").click()
    metrics = page.get_by_role("tabpanel", name="Metrics")
    expect(metrics.get_by_text("chart data: train/loss (live: 10 points")).to_be_visible()
    expect(page.get_by_text("a running run cannot be deleted")).to_be_visible()
    for s in range(10, 25):
        live.log_metrics({"train/loss": float(s)}, step=s)
    _wait_points(ui.paths, live.run_id, 25)
    # no reload: the page of a running run reruns itself
    expect(metrics.get_by_text("chart data: train/loss (live: 25 points")).to_be_visible()
    _png(ui.shot("live"))


def test_agent_page(ui: UI) -> None:
    page = ui.page
    page.goto(f"{ui.url}agent")
    expect(page.get_by_text(re.compile(r"agent up: pid \d+"))).to_be_visible()
    expect(page.get_by_text("Sinks (cursors in the store)")).to_be_visible()
    expect(page.get_by_test_id("stTable").first).to_contain_text("store")
    _png(ui.shot("agent"))
    assert sorted(p.name for p in ui.shots.iterdir()) == sorted(
        f"{n}.png" for n in ("runs-filtered", "runs", "run-metrics", "run-checkpoints", "compare",
                             "delete-confirm", "after-delete", "live", "agent"))
    assert os.path.getsize(ui.shots / "agent.png") > 1000
