"""W&B sink: offline runs read back from wandb's own `.wandb` transaction log (every history row once, with
config and summary), several runs from the runner's worker threads, and an unreachable W&B server that the
sink backs off from while the other sinks deliver, followed by `wal replay --to wandb=offline`."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import AgentProcess
from conftest_backends import (
    drive,
    free_port,
    read_wandb_log,
    run_events,
    tb_scalars,
    wandb_history,
    wandb_logs,
    write_wal,
)

import flightlog
from flightlog.agent.sinks import WandBTracker
from flightlog.agent.sinks.wandb_sink import wandb_run_id
from flightlog.proto.control import connect
from flightlog.proto.events import StatusRequest
from flightlog.proto.paths import AgentPaths

pytestmark = pytest.mark.timeout(240)
KEYS = ["loss", "acc"]


def assert_rows_once(rows: list[dict], steps: int, keys: list[str] = KEYS) -> None:
    counts = Counter(r["_step"] for r in rows)
    assert sorted(counts) == list(range(steps)), "history steps missing"
    assert max(counts.values()) == 1, f"duplicated rows: {[s for s, c in counts.items() if c > 1][:5]}"
    for r in rows:
        for i, k in enumerate(keys):
            assert r[k] == r["_step"] * 10 + i


def test_offline_runs_from_worker_threads(tmp_path: Path) -> None:
    wb = tmp_path / "wandb"
    tracking = {"wandb_mode": "offline", "wandb_dir": str(wb), "wandb_project": "proj"}
    a = run_events("wa", "run-a", tracking, steps=400, keys=KEYS, sinks=["wandb"], description="notes here",
                   tags=["x", "y"])
    b = run_events("wb", "run-b", tracking, steps=250, keys=KEYS, sinks=["wandb"], status="failed")
    c = run_events("wc", "run-c", {**tracking, "wandb_mode": "disabled"}, steps=10, keys=KEYS, sinks=["wandb"])
    interleaved = [e for pair in zip(a, b) for e in pair] + a[len(b):] + c
    write_wal(tmp_path / "wal", interleaved, per_record=64)
    [runner] = drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok", runner.stats.last_error

    rows, config, summary = wandb_history(wb, wandb_run_id("wa"))
    assert_rows_once(rows, 400)
    assert all(abs(r["_timestamp"] - (1.7e9 + r["_step"] * 0.01)) < 1e-3 for r in rows)  # the events' own time
    assert config["lr"] == 0.001 and config["opt.name"] == "adam" and config["tracking"]["wandb_project"] == "proj"
    assert summary["loss"] == 3990 and summary["acc"] == 3991 and summary["text/notes"] == "hello **world**"
    records = [r for p in wandb_logs(wb, wandb_run_id("wa")) for r in read_wandb_log(p)]
    run_rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_rec.run_id == wandb_run_id("wa") and run_rec.display_name == "run-a"
    assert run_rec.notes == "notes here" and list(run_rec.tags)[:2] == ["x", "y"] and run_rec.project == "proj"
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]

    rows_b, _, _ = wandb_history(wb, wandb_run_id("wb"))
    assert_rows_once(rows_b, 250)
    exits_b = [r.exit.exit_code for p in wandb_logs(wb, wandb_run_id("wb")) for r in read_wandb_log(p)
               if r.WhichOneof("record_type") == "exit"]
    assert exits_b == [1]
    assert not wandb_logs(wb, wandb_run_id("wc"))  # mode: disabled

    # The agent restarts with its cursor lost: the sink's state skips everything already logged.
    [again] = drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db2.sqlite")
    assert again.stats.state == "ok"
    assert_rows_once(wandb_history(wb, wandb_run_id("wa"))[0], 400)


def test_unfinished_run_resumes_after_agent_restart(tmp_path: Path) -> None:
    wb = tmp_path / "wandb"
    tracking = {"wandb_mode": "offline", "wandb_dir": str(wb)}
    evs = run_events("wr", "resumed", tracking, steps=300, keys=KEYS, sinks=["wandb"])
    write_wal(tmp_path / "wal", evs[:150])
    drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")  # close() finishes it
    write_wal(tmp_path / "wal", evs[150:])
    drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert len(wandb_logs(wb, wandb_run_id("wr"))) == 2  # the same W&B id, resumed
    assert_rows_once(wandb_history(wb, wandb_run_id("wr"))[0], 300)


def _status(paths: AgentPaths) -> dict:
    client = connect(paths)
    assert client is not None
    try:
        return client.request(StatusRequest()).data  # type: ignore[no-any-return]
    finally:
        client.close()


def test_unreachable_wandb_backs_off_then_replay_offline(agent_paths: AgentPaths, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)  # syntactically valid, never checked by a server
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    wb, tb = tmp_path / "wandb", tmp_path / "tb"
    config = {
        "tracking": {"use_wandb": True, "wandb_mode": "online", "wandb_dir": str(wb), "use_tensorboard": True,
                     "tensorboard_log_dir": str(tb)},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "agent": {"autostart": False},
    }
    agent = AgentProcess(agent_paths).start()
    try:
        with flightlog.experiment_tracking("offline-later", config) as t:
            t.log_hyperparameters({"lr": 0.01})
            for s in range(500):
                t.log_metrics({k: float(s * 10 + i) for i, k in enumerate(KEYS)}, step=s)
        deadline = time.monotonic() + 60
        # TensorBoard first, from disk (its state file says the run ended): a status request racing the
        # agent's release of the finished producer's ring can crash the agent (an ingest bug, reported).
        while not any(json.loads(p.read_text()).get("ended") for p in tb.glob("*/.flightlog-tb.json")):
            assert time.monotonic() < deadline, "TensorBoard never got the run"
            time.sleep(0.2)
        time.sleep(0.5)
        while True:
            st = _status(agent_paths)["sinks"]
            if st["tensorboard"]["backlog_events"] == 0 and st["wandb"]["state"] in ("retrying", "open circuit"):
                break
            assert time.monotonic() < deadline, f"sinks did not settle: {st}"
            time.sleep(0.2)
        print("\nwandb sink while W&B is unreachable:", st["wandb"])
        assert st["store"]["backlog_events"] == 0
        assert st["wandb"]["backlog_events"] > 0 and "W&B" in st["wandb"]["last_error"]
        assert "f" * 40 not in json.dumps(st)
        run_dir = next(tb.iterdir())
        assert {k: len(v) for k, v in tb_scalars(run_dir).items()} == {"loss": 500, "acc": 500}
    finally:
        assert agent.stop(timeout=60) == 0  # a sink stuck in retries does not hold the shutdown
    assert "f" * 40 not in agent.read_log()
    assert not wandb_logs(wb, wandb_run_id(t.run_id)) or not wandb_history(wb, wandb_run_id(t.run_id))[0]

    out = subprocess.run(
        [sys.executable, "-m", "flightlog.agent.replay", str(agent_paths.wal_dir), "--to", "wandb=offline",
         "--no-progress"], capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    rows, config_seen, summary = wandb_history(wb, wandb_run_id(t.run_id))
    assert_rows_once(rows, 500)
    assert config_seen["lr"] == 0.01 and summary["loss"] == 4990
