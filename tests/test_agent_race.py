"""Issue 11, item 3: the 8 ranks of one job create their trackers in the same millisecond, each finding no
agent: one sidecar serves them all, the others' starts leave one line each (no traceback anywhere), and the
job is one completed run with every rank's points."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections import Counter

from test_crashed import wait_status
from test_pipeline import wait_points

from flightlog.proto.paths import AgentPaths

WORLD, N = 8, 50

# A rank as a launcher starts it (torchrun's variables, no torch needed): it spins until the shared moment,
# so the eight tracker constructors run within the same millisecond.
RANK = """
    import sys, time, flightlog
    n, start_at = int(sys.argv[1]), float(sys.argv[2])
    cfg = {"tracking": {"use_tensorboard": False},
           "agent": {"autostart": True, "idle_exit_seconds": 3, "connect_timeout_seconds": 120}}
    time.sleep(max(0.0, start_at - time.time() - 0.05))
    while time.time() < start_at:
        pass
    with flightlog.experiment_tracking("race-job", cfg) as t:
        print(f"RUN {t.run_id}", flush=True)  # one write: ranks share the pipe
        for i in range(n):
            t.log_metrics({"x": float(i)}, step=i)
"""


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)  # never leave a sidecar behind; the asserts below then say what went wrong


def test_eight_ranks_of_one_job_in_the_same_millisecond_get_one_agent(agent_paths: AgentPaths) -> None:
    start_at = time.time() + 6.0  # after every child imported flightlog, even on a loaded machine
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "TORCHELASTIC_RUN_ID": "race8", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(WORLD)}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(RANK), str(N), str(start_at)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    run_ids = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("RUN ")}
    assert run_ids == {"te-race8"}
    wait_status(agent_paths, "te-race8", "completed", timeout=120)
    points = wait_points(agent_paths, "te-race8", WORLD * N)
    assert Counter((p["rank"], p["step"]) for p in points if p["key"] == "x") == {
        (r, s): 1 for r in range(WORLD) for s in range(N)}
    _wait_gone(int((agent_paths.data_dir / "agent.lock").read_text()))
    log = agent_paths.log.read_text()
    assert "Traceback" not in log, log
    assert not any("Traceback" in err for _, err in outs), [err for _, err in outs]
    assert log.count("serving") == 1, log  # one agent; every other start left at once, with one line
    assert log.count("another flightlog agent owns") <= WORLD - 1
