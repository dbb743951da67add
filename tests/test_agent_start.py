"""Agent start with real processes: ranks racing to start sidecars, and a ring backlog larger than one WAL
record waiting for an agent that was down."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter

from conftest import AgentProcess, new_id
from test_pipeline import assert_exactly_once, wait_points

import flightlog
from flightlog.proto.paths import AgentPaths

RACER = """
    import sys, time, flightlog
    run_id, n, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    cfg = {"tracking": {"use_tensorboard": False},
           "agent": {"autostart": True, "idle_exit_seconds": 10, "connect_timeout_seconds": 120}}
    time.sleep(max(0.0, start_at - time.time()))  # every rank starts its tracker at the same moment
    with flightlog.ExperimentTracker("race", cfg, run_id=run_id) as t:
        for i in range(n):
            t.log_metrics({"x": float(i)}, step=i)
"""


def test_eight_ranks_starting_sidecars_at_once_share_one_agent(agent_paths: AgentPaths) -> None:
    runs, n = [f"race{r}-{new_id()}" for r in range(8)], 500
    start_at = time.time() + 8.0  # after every child has imported flightlog, even on a loaded machine
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RACER), run, str(n), str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run in runs]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        errs.append(err)
    for run in runs:
        assert_exactly_once(wait_points(agent_paths, run, n), ["x"], n)
    pid = int((agent_paths.data_dir / "agent.lock").read_text())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the sidecar exits once idle and drained
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    log = agent_paths.log.read_text()
    assert "Traceback" not in log, log
    assert not any("Traceback" in e for e in errs), errs
    assert log.count("serving") == 1, log  # one agent served them all; the others left at once
    losers = log.count("another flightlog agent owns")
    assert log.count("stopped") == 1 and losers <= 7, log


TEXT = "t" * 150_000


def test_ring_backlog_over_the_record_limit_is_ingested_once(agent_paths: AgentPaths) -> None:
    """~300 MiB waits in a 512 MiB ring while no agent runs. The agent used to die at start on it (one
    record over the WAL's 256 MiB limit, a ValueError its ingest loop did not catch), and at every restart."""
    n = 2000  # 2000 texts of 150 kB, and one metric point each
    cfg = {"tracking": {"use_tensorboard": False}, "agent": {"autostart": False, "ring_bytes": 512 << 20}}
    with flightlog.experiment_tracking("backlog", cfg) as t:
        for i in range(n):
            t.log_metrics({"i": float(i)}, step=i)
            t.log_text("blob", f"{i:06d}{TEXT}", step=i)
        run_id = t.run_id
    ring = next(agent_paths.ring_dir.glob("*.ring"))
    assert ring.stat().st_size > 300 << 20
    agent = AgentProcess(agent_paths).start()
    try:
        assert_exactly_once(wait_points(agent_paths, run_id, n, timeout=300), ["i"], n)
        out = subprocess.run(
            [sys.executable, "-m", "flightlog.agent.cli", "runs", "export", run_id, "--format", "jsonl"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        rows = [r for r in map(json.loads, out) if r["key"] == "i"]
        assert sorted(r["step"] for r in rows) == list(range(n))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            db = sqlite3.connect(f"file:{agent_paths.store}?mode=ro", uri=True)
            try:
                texts = db.execute("SELECT step, substr(text, 1, 6) FROM texts WHERE run_id=?", (run_id,)).fetchall()
            finally:
                db.close()
            if len(texts) >= n:
                break
            time.sleep(0.5)
        counts = Counter(texts)
        assert sorted(counts) == [(i, f"{i:06d}") for i in range(n)] and set(counts.values()) == {1}
        assert agent.proc is not None and agent.proc.poll() is None, agent.read_log()
    finally:
        agent.stop()
    assert "Traceback" not in agent.read_log()
