"""Poison isolation end to end (issue 9, item 7), with a real agent process and a real MLflow server: an event
SQLite cannot hold (step 2**63) and a metric key MLflow refuses (``acc@top1``) are quarantined for their run on
that sink only; a run logged after them reaches the store and MLflow in full, and so do runs after an agent
SIGKILL and restart. The bad events are written into the WAL below the SDK, which refuses such input."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from conftest_backends import MlflowServer, mlflow_server, write_wal  # noqa: F401
from test_sinks_mlflow import assert_metrics_once, find_run, wait_metric_count

import flightlog
from flightlog.agent.store import Store
from flightlog.agent.wal import WalCursor, WALReader, inspect_wal
from flightlog.proto.codec import decode_event
from flightlog.proto.events import Event, Metrics, RunStart
from flightlog.proto.paths import AgentPaths

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")]

STEPS = 300


def _config(tmp_path: Path, uri: str) -> dict[str, Any]:
    return {
        "tracking": {"use_tensorboard": False, "use_mlflow": True, "mlflow_tracking_uri": uri,
                     "mlflow_experiment_name": "quarantine"},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "agent": {"autostart": False},
    }


def _bad_runs(uri: str) -> list[Event]:
    tracking = {"mlflow_tracking_uri": uri, "mlflow_experiment_name": "quarantine"}
    evs: list[Event] = []
    for run, sinks in (("bad-store", ["store"]), ("bad-mlflow", ["store", "mlflow"])):
        evs.append(RunStart(run, run, 1.7e9, config={"tracking": tracking}, sinks=sinks))
        evs += [Metrics(run, s, 1.7e9 + s, {"loss": float(s)}) for s in range(5)]
    evs.append(Metrics("bad-store", 2**63, 1.7e9 + 9, {"m": 1.0}))  # SQLite: OverflowError
    evs.append(Metrics("bad-mlflow", 5, 1.7e9 + 9, {"acc@top1": 1.0}))  # MLflow's key rule: HTTP 400
    evs += [Metrics(run, 6, 1.7e9 + 10, {"loss": 6.0}) for run in ("bad-store", "bad-mlflow")]
    return evs


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _store_points(paths: AgentPaths, run_id: str) -> int:
    if not paths.store.exists():
        return 0
    store = Store(paths.store, readonly=True)
    try:
        return store.metric_count(run_id)
    except sqlite3.Error:  # the table is not there yet
        return 0
    finally:
        store.close()


def _quarantine(paths: AgentPaths) -> list[tuple[str, str, str, int]]:
    store = Store(paths.store, readonly=True)
    try:
        return [(r["sink"], r["run_id"], r["scope"], r["seq"]) for r in store.quarantine_rows()]
    finally:
        store.close()


def _log_good_run(tmp_path: Path, uri: str, name: str) -> str:
    with flightlog.experiment_tracking(name, _config(tmp_path, uri)) as t:
        for s in range(STEPS):
            t.log_metrics({"loss": float(s * 10), "acc": float(s * 10 + 1)}, step=s)
    return t.run_id


def _good_run_arrived(paths: AgentPaths, uri: str, run_id: str) -> None:
    _wait(lambda: _store_points(paths, run_id) == 2 * STEPS, 60, f"run {run_id} in the store")
    assert wait_metric_count(uri, "quarantine", run_id, "acc", STEPS, 90) == STEPS
    assert_metrics_once(uri, find_run(uri, "quarantine", run_id).info.run_id, ["loss", "acc"], STEPS)


def test_bad_events_quarantine_their_run_on_one_sink_only(mlflow_server: MlflowServer, agent_paths: AgentPaths,
                                                          tmp_path: Path) -> None:
    uri = mlflow_server.uri
    # Below the SDK: straight into the agent's WAL, ahead of everything logged later.
    write_wal(agent_paths.wal_dir, _bad_runs(uri), per_record=4)
    agent = AgentProcess(agent_paths).start()
    try:
        good = _log_good_run(tmp_path, uri, "good-after-bad")
        _good_run_arrived(agent_paths, uri, good)
        _wait(lambda: len(_quarantine(agent_paths)) >= 2, 30, "two quarantine records")
        rows = _quarantine(agent_paths)
        assert ("store", "bad-store", "event", 12) in rows, rows  # only the bad event (seq 12), on the store
        assert [r[:3] for r in rows if r[0] == "mlflow"] == [("mlflow", "bad-mlflow", "run")], rows
        assert not [r for r in rows if r[1] == good], rows
        # The store has everything of bad-store but the one event, and all of bad-mlflow.
        assert _store_points(agent_paths, "bad-store") == 6
        assert _store_points(agent_paths, "bad-mlflow") == 7
        # `flightlog status` and `runs ls` show it.
        st = _cli("status")
        assert "quarantined" in st and "bad-mlflow" in st and "acc@top1" in st, st
        ls = json.loads(_cli("runs", "ls", "--json"))
        by_run = {r["run_id"]: r["quarantined"] for r in ls}
        assert by_run["bad-mlflow"] == "mlflow" and by_run["bad-store"] == "store:1" and by_run[good] == ""
        assert "QUARANTINED" in _cli("runs", "ls")

        agent.kill()  # SIGKILL: the quarantine and the cursors past it must hold
        agent = AgentProcess(agent_paths).start()
        again = _log_good_run(tmp_path, uri, "good-after-restart")
        _good_run_arrived(agent_paths, uri, again)
        assert sorted(_quarantine(agent_paths)) == sorted(rows)  # nothing re-refused, nothing stuck
        assert _store_points(agent_paths, "bad-store") == 6
    finally:
        agent.stop()

    # The quarantined events are a WAL `flightlog wal replay` reads: the MLflow run with its RunStart first.
    qdir = agent_paths.data_dir / "quarantine" / "mlflow"
    assert inspect_wal(qdir)["totals"]["events"] >= 3
    with WALReader(qdir) as reader:
        items, _ = reader.read(WalCursor(), max_events=100)
    events = [decode_event(p) for _, p in items]
    assert type(events[0]) is RunStart and events[0].run_id == "bad-mlflow"
    assert any(type(e) is Metrics and "acc@top1" in e.values for e in events)
    assert {e.run_id for e in events} == {"bad-mlflow"}
    store_q = agent_paths.data_dir / "quarantine" / "store"
    with WALReader(store_q) as reader:
        [(_, payload)] = reader.read(WalCursor(), max_events=100)[0]
    assert decode_event(payload) == Metrics("bad-store", 2**63, 1.7e9 + 9, {"m": 1.0})
    # Replaying it (the key is still refused) quarantines it again in the replay's own state, with exit code 2.
    rep = subprocess.run([sys.executable, "-m", "flightlog.agent.replay", str(qdir), "--to", f"mlflow={uri}",
                          "--no-progress", "--state-dir", str(tmp_path / "rs")], capture_output=True, text=True, check=False,
                         timeout=120)
    assert rep.returncode == 2 and "refused for good" in rep.stderr, rep.stderr


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", *args], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout
