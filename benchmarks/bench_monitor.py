"""CPU cost of the agent's system monitor, printed as JSON.

The monitor runs alone in this process, in an anyio loop exactly as in the agent (one task, sampling in a
worker thread), over a real local store with ``--runs`` running runs (each with its own live trainer
process) and a real WAL for its SystemStats events; the figure is this process's CPU time (psutil
cpu_times, user + system) over the wall time, as a percentage of one core. Target: ≤ 2 % at 1 s.

Usage: python benchmarks/bench_monitor.py [--seconds 30] [--interval 1.0] [--runs 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import psutil

from flightlog.agent.monitor import Monitor
from flightlog.agent.store import Store
from flightlog.agent.wal import SRC_INTERNAL, WAL
from flightlog.proto.codec import encode_event
from flightlog.proto.events import Event, RunStart, SystemStats
from flightlog.proto.frames import append_frame
from flightlog.proto.paths import AgentPaths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=4, help="running runs, each with one trainer process")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flbm-"))
    data = work / "data"
    data.mkdir()
    paths = AgentPaths(data_dir=data, socket=work / "a.sock", ring_dir=work / "rings", spill_dir=data / "spill")
    trainers = [subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.5)"])
                for _ in range(args.runs)]
    store = Store(paths.store)
    cfg = {"monitoring": {"interval_seconds": args.interval},
           "checkpointing": {"checkpoint_dir": str(work / "ckpt")},
           "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(work / "tb")}}
    store.apply([RunStart(f"run{i}", "bench", time.time(), config=cfg, pid=p.pid, host=socket.gethostname(),
                          rank=0) for i, p in enumerate(trainers)])
    store.close()
    producers = [{"producer": f"run{i}-{p.pid}-x", "pid": p.pid, "rank": 0, "closed": False}
                 for i, p in enumerate(trainers)]

    wal = WAL(paths.wal_dir, fsync="never")
    emitted = [0]

    def emit(event: Event) -> None:  # what Agent.emit does, minus waking sink runners
        buf = bytearray()
        append_frame(buf, encode_event(event))
        wal.append(buf, 1, "agent", SRC_INTERNAL)
        if isinstance(event, SystemStats):
            emitted[0] += 1

    monitor = Monitor(paths, lambda: producers, emit, {"monitoring": {"interval_seconds": args.interval}})
    me = psutil.Process()

    async def run() -> dict[str, float]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.run)
            await anyio.sleep(min(3.0, args.seconds / 5))  # warm-up: imports, first samples, NVML init
            c0, t0, n0 = me.cpu_times(), time.monotonic(), emitted[0]
            await anyio.sleep(args.seconds)
            c1, t1, n1 = me.cpu_times(), time.monotonic(), emitted[0]
            tg.cancel_scope.cancel()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        return {"cpu_seconds": cpu, "wall_seconds": t1 - t0, "events": n1 - n0}

    try:
        r = anyio.run(run)
    finally:
        for p in trainers:
            p.kill()
            p.wait()
        wal.close()
    samples = r["events"] / max(1, args.runs)
    print(json.dumps({
        "benchmark": "monitor",
        "interval_seconds": args.interval,
        "runs": args.runs,
        "seconds": round(r["wall_seconds"], 2),
        "system_stats_events": int(r["events"]),
        "cpu_percent_of_one_core": round(100 * r["cpu_seconds"] / r["wall_seconds"], 3),
        "cpu_ms_per_sampling_pass": round(1000 * r["cpu_seconds"] / max(1.0, samples), 3),
        "target_percent": 2.0,
        "gpus_monitored": monitor.gpu.available is True,
        "nvml": monitor.gpu.reason or "ok",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
