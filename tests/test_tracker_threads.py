"""The tracker from several threads at once, through a real agent into the local store: the owner thread's
ring keeps its single producer, every other thread goes through the side channel, nothing is lost."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from conftest import AgentProcess
from test_pipeline import assert_exactly_once, wait_points

import flightlog
from flightlog.proto.paths import AgentPaths

N_MAIN = 100_000


def _texts(paths: AgentPaths, run_id: str, n: int, timeout: float = 60.0) -> list[tuple[str, int, str]]:
    deadline = time.monotonic() + timeout
    rows: list[tuple[str, int, str]] = []
    while time.monotonic() < deadline:
        db = sqlite3.connect(f"file:{paths.store}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT key, step, text FROM texts WHERE run_id=?", (run_id,)).fetchall()
        except sqlite3.OperationalError:
            rows = []
        finally:
            db.close()
        if len(rows) >= n:
            return rows
        time.sleep(0.1)
    return rows


def _export(run_id: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "runs", "export", run_id, "--format", "jsonl"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [r for r in map(json.loads, out) if not r["key"].startswith("system/")]


def test_log_text_from_three_threads_while_the_main_thread_logs_metrics(agent: AgentProcess,
                                                                       base_config: dict) -> None:
    per_thread = 2_000
    t = flightlog.ExperimentTracker("threads", {**base_config, "agent": {"autostart": False, "ring_bytes": 1 << 20}})
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def texts(i: int) -> None:
        try:
            start.wait()
            for j in range(per_thread):
                t.log_text(f"cb{i}", f"thread {i} message {j} " + "x" * (j % 50), step=j)
                if j % 500 == 0:
                    t.set_tags({f"t{i}": str(j)})
                    t.log_hyperparameters({f"p{i}": j})
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=texts, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    start.wait()
    for step in range(N_MAIN):
        t.log_metrics({"loss": 1.0 / (step + 1), "acc": step / N_MAIN}, step=step)
    for th in threads:
        th.join()
    assert not errors, errors
    t.finish()
    points = wait_points(agent.paths, t.run_id, 2 * N_MAIN, timeout=120)
    assert_exactly_once(points, ["loss", "acc"], N_MAIN)
    rows = _texts(agent.paths, t.run_id, 3 * per_thread)
    counts = Counter((k, s) for k, s, _ in rows)
    assert len(rows) == 3 * per_thread and set(counts.values()) == {1}
    for key, step, text in rows:
        i = int(key[2:])
        assert text == f"thread {i} message {step} " + "x" * (step % 50)  # every byte intact
    exported = _export(t.run_id)
    assert len(exported) == 2 * N_MAIN
    by = {(r["key"], r["step"]): r["value"] for r in exported}
    assert by[("loss", 9)] == pytest.approx(0.1) and by[("acc", N_MAIN - 1)] == pytest.approx(1 - 1 / N_MAIN)
    store = sqlite3.connect(agent.paths.store)
    params = dict(store.execute("SELECT key, value FROM params WHERE run_id=?", (t.run_id,)).fetchall())
    tags = dict(store.execute("SELECT key, value FROM tags WHERE run_id=?", (t.run_id,)).fetchall())
    status = store.execute("SELECT status FROM runs WHERE run_id=?", (t.run_id,)).fetchone()[0]
    store.close()
    assert params == {f"p{i}": "1500" for i in range(3)}
    assert tags == {f"t{i}": "1500" for i in range(3)}
    assert status == "completed"


def test_log_metrics_from_other_threads(agent: AgentProcess, base_config: dict) -> None:
    n = 20_000
    t = flightlog.ExperimentTracker("metric-threads", base_config)
    go = threading.Barrier(3)
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            go.wait()
            for step in range(n):
                t.log_metrics({key: float(step), f"{key}_int": step}, step=step)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("w1", "w2")]
    for th in threads:
        th.start()
    go.wait()
    for step in range(n):
        t.log_metrics({"main": float(step)}, step=step)
    for th in threads:
        th.join()
    assert not errors, errors
    t.finish()
    points = wait_points(agent.paths, t.run_id, 5 * n, timeout=120)
    assert_exactly_once(points, ["main", "w1", "w1_int", "w2", "w2_int"], n)
    assert all(p["value"] == p["step"] for p in points)


def test_only_other_threads_log_and_finish_from_a_thread(agent: AgentProcess, base_config: dict) -> None:
    """The tracker made in one thread, used and finished in another: the RunEnd comes after the events."""
    t = flightlog.ExperimentTracker("elsewhere", base_config)

    def train() -> None:
        for step in range(1000):
            t.log_metrics({"x": float(step)})  # step=None: previous + 1
        t.log_text("note", "done")
        t.finish()

    th = threading.Thread(target=train)
    th.start()
    th.join()
    points = wait_points(agent.paths, t.run_id, 1000)
    assert_exactly_once(points, ["x"], 1000)
    assert _texts(agent.paths, t.run_id, 1) == [("note", 999, "done")]
    with pytest.raises(flightlog.FlightlogError, match="finished"):
        t.log_text("late", "after finish")
    with pytest.raises(flightlog.FlightlogError, match="finished"):
        t.log_metrics({"late": 1.0})


def test_side_channel_without_an_agent_then_one_comes(agent_paths: AgentPaths, base_config: dict) -> None:
    """No agent to order the rings: the side ring starts with the RunStart, so nothing of it is lost."""
    t = flightlog.ExperimentTracker("late-agent", base_config)
    th = threading.Thread(target=lambda: [t.log_metrics({"side": float(i)}, step=i) for i in range(100)])
    th.start()
    th.join()
    for i in range(100):
        t.log_metrics({"main": float(i)}, step=i)
    proc = AgentProcess(agent_paths).start()
    try:
        t.finish()
        points = wait_points(agent_paths, t.run_id, 200)
        assert_exactly_once(points, ["main", "side"], 100)
    finally:
        proc.stop()


def test_socket_transport_from_several_threads(agent: AgentProcess, base_config: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where rings are not safe every thread shares the socket batcher, behind its lock."""
    monkeypatch.setenv("FLIGHTLOG_TRANSPORT", "socket")
    n = 5_000
    t = flightlog.ExperimentTracker("socket-threads", base_config)
    assert t._producer is None
    threads = [threading.Thread(target=lambda i=i: [t.log_text(f"s{i}", f"{i}:{j}", step=j) for j in range(500)])
               for i in range(2)]
    for th in threads:
        th.start()
    for step in range(n):
        t.log_metrics({"m": float(step)}, step=step)
    for th in threads:
        th.join()
    t.finish()
    assert_exactly_once(wait_points(agent.paths, t.run_id, n), ["m"], n)
    rows = _texts(agent.paths, t.run_id, 1000)
    assert sorted(rows) == sorted((f"s{i}", j, f"{i}:{j}") for i in range(2) for j in range(500))
