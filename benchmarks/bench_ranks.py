"""Logging from the ranks of one job at full speed into one node agent, printed as JSON (issue 11, figure 2):
each rank's ``log_metrics`` latency (p50/p99, 4 values per call) and the agent's CPU (% of one core, user +
system, over the logging window and until every rank's flush returned), for 4 ranks next to 1 rank (the
anchor) in the same run; the ratio says what sharing one agent costs a rank.

Usage: python benchmarks/bench_ranks.py [--calls 200000] [--ranks 1,4] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve()
METRICS = {"loss": 0.5, "acc": 0.9, "lr": 1e-4, "grad_norm": 1.25}


def rank_main(argv: list[str]) -> int:
    """One rank: tracker up, say ready, wait for go, log ``calls`` times as fast as it can, flush, report."""
    import flightlog

    calls, work = int(argv[0]), Path(argv[1])
    cfg = {"tracking": {"use_tensorboard": False}, "agent": {"autostart": False, "ring_bytes": 256 << 20}}
    t = flightlog.ExperimentTracker("ranks-bench", cfg)
    log, pc = t.log_metrics, time.perf_counter_ns
    for i in range(20_000):  # warm-up (the same ring; steps go on from here)
        log(METRICS, step=i)
    (work / f"ready-{os.getpid()}").touch()
    while not (work / "go").exists():
        time.sleep(0.001)
    lat = [0] * calls
    start = time.perf_counter()
    for i in range(calls):
        t0 = pc()
        log(METRICS, step=20_000 + i)
        lat[i] = pc() - t0
    logged = time.perf_counter() - start
    t.flush()
    durable = time.perf_counter() - start
    t.finish()
    lat.sort()
    print(json.dumps({"rank": t.rank, "p50_us": lat[calls // 2] / 1000, "p99_us": lat[int(calls * 0.99)] / 1000,
                      "logging_s": logged, "until_flushed_s": durable,
                      "spilled": t._producer.spilled if t._producer else 0}))
    return 0


def _cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(ranks: int, calls: int, root: Path) -> dict[str, Any]:
    work = root / f"ranks{ranks}"
    work.mkdir()
    sock_dir = Path(tempfile.mkdtemp(prefix="flbr-", dir="/tmp"))
    env = {**os.environ, "FLIGHTLOG_DATA_DIR": str(work / "data"), "FLIGHTLOG_AGENT_SOCKET": str(sock_dir / "a.sock"),
           "TORCHELASTIC_RUN_ID": f"bench{uuid.uuid4().hex[:8]}", "WORLD_SIZE": str(ranks)}
    agent = subprocess.Popen([sys.executable, "-m", "flightlog.agent", "--data-dir", env["FLIGHTLOG_DATA_DIR"],
                              "--socket", env["FLIGHTLOG_AGENT_SOCKET"]], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (sock_dir / "a.sock").exists():
            time.sleep(0.05)
        procs = [subprocess.Popen([sys.executable, str(HERE), "--rank-child", str(calls), str(work)],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
                 for r in range(ranks)]
        while len(list(work.glob("ready-*"))) < ranks:
            time.sleep(0.01)
        agent_ps = psutil.Process(agent.pid)
        cpu0, t0 = _cpu(agent_ps), time.perf_counter()
        (work / "go").touch()
        outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
        wall = time.perf_counter() - t0
        agent_cpu = _cpu(agent_ps) - cpu0
    finally:
        agent.terminate()
        agent.wait(60)
        shutil.rmtree(sock_dir, ignore_errors=True)
    p50s = sorted(o["p50_us"] for o in outs)
    return {
        "ranks": ranks, "calls_per_rank": calls, "per_rank": sorted(outs, key=lambda o: o["rank"]),
        "p50_us_median_over_ranks": p50s[len(p50s) // 2], "p50_us_worst_rank": p50s[-1],
        "events_per_s_total": ranks * calls / max(o["until_flushed_s"] for o in outs),
        "agent_cpu_percent_of_one_core": 100.0 * agent_cpu / wall, "window_s": wall,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-child":
        sys.exit(rank_main(sys.argv[2:]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.calls = 20_000
    root = Path(tempfile.mkdtemp(prefix="flbench-ranks-"))
    try:
        rows = [measure(int(k), args.calls, root) for k in args.ranks.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "runs": rows}
    if len(rows) > 1:
        out["p50_ratio_many_over_one"] = rows[-1]["p50_us_median_over_ranks"] / rows[0]["p50_us_median_over_ranks"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
