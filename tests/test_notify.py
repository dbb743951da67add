"""Failures reach the person training: a run with W&B asked for and no W&B login prints, on the trainer's
stderr, a line naming W&B and the reason while the run goes on, finish() prints each sink's delivery, and
``tracker.health()`` returns the same as data; the other sinks deliver everything."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from conftest import AgentProcess
from conftest_backends import tb_scalars

import flightlog
from flightlog.agent.store import Store
from flightlog.health import HealthWatcher, describe
from flightlog.proto.paths import AgentPaths

pytestmark = pytest.mark.timeout(180)
STEPS = 200


@pytest.fixture
def no_wandb_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B online without a key: no WANDB_API_KEY, no netrc, no settings file, no offline mode."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DISABLED", "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))


def test_wandb_without_login_reaches_the_trainer(agent_paths: AgentPaths, tmp_path: Path, no_wandb_login: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    agent = AgentProcess(agent_paths).start()  # after the environment above: the agent has no W&B login either
    try:
        config = {
            "tracking": {"use_wandb": True, "wandb_mode": "online", "wandb_dir": str(tmp_path / "wandb"),
                         "use_tensorboard": True, "tensorboard_log_dir": str(tmp_path / "tb")},
            "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
            "agent": {"autostart": False},
            "notify": {"after_seconds": 1.0, "finish_wait_seconds": 20.0},
        }
        tracker = flightlog.ExperimentTracker("nologin", config)
        for step in range(STEPS):
            tracker.log_metrics({"loss": step * 0.5}, step=step)
        tracker.flush()
        t0 = time.monotonic()
        said = ""
        while "W&B" not in said and time.monotonic() - t0 < 60:
            time.sleep(0.1)
            said += capsys.readouterr().err
        waited = time.monotonic() - t0
        # While the run goes on: one line naming W&B, the reason, the events kept and the replay command.
        [line] = [ln for ln in said.splitlines() if "W&B" in ln]
        assert "API key" in line and "parked" in line and "events kept" in line, line
        assert "flightlog wal replay" in line and "--to wandb=online" in line and tracker.run_id in line, line
        report = tracker.health()
        wb = report["sinks"]["wandb"]
        assert wb["status"] == "parked" and "API key" in wb["reason"], wb
        assert wb["kept_events"] >= STEPS  # RunStart and every metric are kept in the sink's quarantine
        assert wb["parked"] and wb["delivered"] == 0 and wb["quarantined_events"] == wb["kept_events"], wb
        assert "API key" in wb["quarantine_reason"], wb
        assert set(report["sinks"]) == {"store", "tensorboard", "wandb"}
        tracker.finish()
        out = capsys.readouterr().err
        summary = out[out.index("delivery of run"):]
        assert "local store: delivered" in summary and "TensorBoard: delivered" in summary, summary
        assert "W&B:" in summary and "parked" in summary, summary
        final = tracker.health()  # after finish(): the summary as data
        assert final["sinks"]["store"]["status"] == "delivered" and final["sinks"]["wandb"]["status"] == "parked"
        # The run's own counts: every event of it (RunStart ... RunEnd) through the store and TensorBoard alike.
        store, tb = final["sinks"]["store"], final["sinks"]["tensorboard"]
        assert store["delivered"] == tb["delivered"] >= STEPS + 2 and store["pending"] == tb["pending"] == 0, final
        # The other sinks delivered everything.
        with Store(agent_paths.store, readonly=True) as store:
            assert store.metric_series(tracker.run_id, "loss") == [(s, s * 0.5) for s in range(STEPS)]
        [run_dir] = (tmp_path / "tb").iterdir()
        assert tb_scalars(run_dir)["loss"] == [(s, s * 0.5) for s in range(STEPS)]
        print(f"W&B line after {waited:.2f} s")
    finally:
        agent.stop()


def test_watcher_says_each_trouble_once() -> None:
    """The rate limit: the same trouble of a sink is said once; a new reason is said; a sink that recovered
    and fails again is said again."""
    out = io.StringIO()
    w = HealthWatcher(AgentPaths.__new__(AgentPaths), "r1", 30.0, stream=out)  # never started: no thread
    parked = {"sink": "mlflow", "label": "MLflow", "status": "parked", "reason": "401 Unauthorized", "alert": True,
              "kept_events": 12345, "replay": "flightlog wal replay q --to mlflow=http://x --run r1",
              "retrying_seconds": 0.0}
    report = {"sinks": {"mlflow": parked, "store": {"sink": "store", "status": "delivered", "alert": False}}}
    assert len(w.announce(report, now=0.0)) == 1
    assert w.announce(report, now=10.0) == []
    assert len(w.announce({"sinks": {"mlflow": {**parked, "reason": "403 Forbidden"}}}, now=11.0)) == 1
    assert w.announce({"sinks": {"mlflow": {**parked, "alert": False, "status": "delivered"}}}, now=12.0) == []
    assert len(w.announce(report, now=13.0)) == 1
    assert out.getvalue().count("\n") == 3
    assert describe(parked) == ("MLflow: 401 Unauthorized — parked; 12,345 events kept in the WAL; fix and run "
                                "`flightlog wal replay q --to mlflow=http://x --run r1`")
