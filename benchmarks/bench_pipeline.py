"""Event pipeline figures, printed as JSON: log_metrics latency next to its peers (wandb offline, mlflow
sqlite sync and async, tensorboardX add_scalar x4), the agent's ingest rate, and `import flightlog` time.

Usage: python benchmarks/bench_pipeline.py [--calls 200000] [--peer-calls 2000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METRICS = {"loss": 0.5, "acc": 0.9, "lr": 1e-4, "grad_norm": 1.25}


def percentiles(ns: list[int]) -> dict[str, float]:
    ns = sorted(ns)
    return {
        "p50_us": ns[len(ns) // 2] / 1000,
        "p99_us": ns[int(len(ns) * 0.99)] / 1000,
        "mean_us": sum(ns) / len(ns) / 1000,
        "calls": len(ns),
    }


def timed(fn, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    pc = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = pc()
        fn(i)
        out[i] = pc() - t0
    return out


def timer_overhead() -> float:
    pc = time.perf_counter_ns
    xs = []
    for _ in range(100_000):
        a = pc()
        b = pc()
        xs.append(b - a)
    return statistics.median(xs) / 1000


def bench_flightlog(work: Path, calls: int) -> dict:
    import flightlog

    os.environ["FLIGHTLOG_DATA_DIR"] = str(work / "fl-data")
    os.environ["FLIGHTLOG_AGENT_SOCKET"] = str(Path(tempfile.mkdtemp(prefix="flb-")) / "a.sock")
    cfg = {"tracking": {"use_tensorboard": False}, "agent": {"ring_bytes": 64 << 20, "idle_exit_seconds": 1}}
    t = flightlog.ExperimentTracker("bench", cfg)
    log = t.log_metrics
    timed(lambda i: log(METRICS, step=i), 20_000)  # warm-up
    lat = timed(lambda i: log(METRICS, step=20_000 + i), calls)
    t0 = time.perf_counter()
    t.finish()
    res = percentiles(lat)
    res["finish_flush_s"] = time.perf_counter() - t0
    res["spilled"] = t._producer.spilled if t._producer else 0
    return res


def bench_tensorboardx(work: Path, calls: int) -> dict:
    from tensorboardX import SummaryWriter

    w = SummaryWriter(str(work / "tbx"))

    def one(i: int) -> None:
        for k, v in METRICS.items():
            w.add_scalar(k, v, i)

    lat = timed(one, calls)
    w.close()
    return percentiles(lat)


def bench_mlflow(work: Path, calls: int, synchronous: bool) -> dict:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / f'mlflow-{synchronous}.db'}")
    mlflow.set_experiment("bench")
    with mlflow.start_run():
        lat = timed(lambda i: mlflow.log_metrics(METRICS, step=i, synchronous=synchronous), calls)
        if not synchronous:
            from mlflow.utils.async_logging.run_operations import RunOperations  # noqa: F401
    mlflow.flush_async_logging() if hasattr(mlflow, "flush_async_logging") else None
    return percentiles(lat)


def bench_wandb(work: Path, calls: int) -> dict:
    import wandb

    run = wandb.init(project="bench", mode="offline", dir=str(work), settings=wandb.Settings(silent=True))
    lat = timed(lambda i: run.log(METRICS, step=i), calls)
    run.finish()
    return percentiles(lat)


def bench_ingest_prefilled(work: Path, events: int) -> dict:
    """Drain a pre-filled ring into a WAL with a group-commit fsync every 100 ms (in-process)."""
    from flightlog.agent.ingest import Ingestor
    from flightlog.agent.wal import WAL
    from flightlog.proto.codec import event_encoder
    from flightlog.proto.events import Metrics
    from flightlog.ring import RingProducer

    ring_dir = Path(tempfile.mkdtemp(prefix="flring-", dir="/dev/shm"))
    try:
        prod = RingProducer(ring_dir / "p.ring", 1 << 27, "p", work / "spill")
        buf = bytearray(256)
        now = time.time()
        for i in range(events):
            event_encoder.encode_into(Metrics("0123456789abcdef", i, now, METRICS), buf, 0)
            prod.write_frame(buf)
        assert prod.spilled == 0, "ring too small for the pre-fill"
        wal = WAL(work / "wal-ingest", fsync="interval")
        ing = Ingestor(wal, ring_dir)
        ing.scan()
        stop = threading.Event()

        def fsyncer() -> None:
            while not stop.wait(0.1):
                wal.sync()

        th = threading.Thread(target=fsyncer)
        th.start()
        t0 = time.perf_counter()
        done = 0
        while done < events:
            done += ing.drain()
        wal.sync()
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        nbytes = wal.total_bytes()
        ing.close()
        wal.close()
        prod.close()
        return {"events": events, "seconds": dt, "events_per_second": events / dt, "wal_bytes": nbytes}
    finally:
        shutil.rmtree(ring_dir, ignore_errors=True)


PUSHER = r"""
import os, sys, time, flightlog
t = flightlog.ExperimentTracker("push", {"tracking": {"use_tensorboard": False},
                                 "agent": {"autostart": False, "ring_bytes": 8 << 20}})
m = {"loss": 0.5, "acc": 0.9, "lr": 1e-4, "grad_norm": 1.25}
n = int(sys.argv[1]); log = t.log_metrics
t0 = time.perf_counter()
for i in range(n):
    log(m, step=i)
dt = time.perf_counter() - t0
spilled, dropped = t._producer.spilled, t._producer.dropped
t.finish()
print(n / dt, spilled, dropped)
"""


def bench_ingest_live(work: Path, events: int, producers: int) -> dict:
    """Producers log as fast as they can into a running agent: rate, spill/drop, the agent's CPU."""
    import psutil

    data = work / "live-data"
    sock = Path(tempfile.mkdtemp(prefix="flb-")) / "a.sock"
    env = {**os.environ, "FLIGHTLOG_DATA_DIR": str(data), "FLIGHTLOG_AGENT_SOCKET": str(sock)}
    agent = subprocess.Popen([sys.executable, "-m", "flightlog.agent", "--data-dir", str(data), "--socket", str(sock)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.05)
        ap = psutil.Process(agent.pid)
        cpu0 = ap.cpu_times()
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(events)], env=env, stdout=subprocess.PIPE,
                                  text=True) for _ in range(producers)]
        outs = [p.communicate()[0].split() for p in procs]
        wall = time.perf_counter() - t0
        cpu1 = ap.cpu_times()
        agent_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        rates = [float(o[0]) for o in outs]
        return {
            "producers": producers, "events_per_producer": events,
            "producer_events_per_second": rates, "spilled": [int(o[1]) for o in outs],
            "dropped": [int(o[2]) for o in outs], "wall_seconds": wall,
            "agent_cpu_seconds": agent_cpu, "agent_cpu_fraction_of_one_core": agent_cpu / wall,
        }
    finally:
        agent.terminate()
        agent.wait(30)
        shutil.rmtree(sock.parent, ignore_errors=True)


def bench_import() -> dict:
    code = ("import time,sys; t=time.perf_counter(); import flightlog; d=time.perf_counter()-t; "
            "print(d, [m for m in ('torch','wandb','mlflow','tensorboardX') if m in sys.modules])")
    times, heavy = [], []
    for _ in range(7):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        d, mods = out.split(" ", 1)
        times.append(float(d) * 1000)
        heavy = eval(mods)  # a list literal printed by the child
    return {"median_ms": statistics.median(times), "max_ms": max(times), "heavy_modules_imported": heavy}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--peer-calls", type=int, default=2_000)
    ap.add_argument("--ingest-events", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.peer_calls, args.ingest_events = 20_000, 300, 200_000
    work = Path(tempfile.mkdtemp(prefix="flbench-"))
    os.environ.setdefault("WANDB_SILENT", "true")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "timer_overhead_us": timer_overhead()}
    try:
        lat = {"flightlog": bench_flightlog(work, args.calls)}
        lat["tensorboardX_add_scalar_x4"] = bench_tensorboardx(work, args.peer_calls * 5)
        lat["mlflow_log_metrics_sync_sqlite"] = bench_mlflow(work, args.peer_calls // 4, True)
        lat["mlflow_log_metrics_async_sqlite"] = bench_mlflow(work, args.peer_calls, False)
        lat["wandb_log_offline"] = bench_wandb(work, args.peer_calls)
        fastest_peer = min((v["p50_us"], k) for k, v in lat.items() if k != "flightlog")
        results["log_metrics_4_values"] = lat
        results["log_metrics_ratio"] = {
            "fastest_peer": fastest_peer[1],
            "peer_p50_over_flightlog_p50": fastest_peer[0] / lat["flightlog"]["p50_us"],
        }
        results["ingest_prefilled_ring_to_wal"] = bench_ingest_prefilled(work, args.ingest_events)
        results["ingest_live"] = bench_ingest_live(work, args.ingest_events // 2, 1)
        results["ingest_live_4_producers"] = bench_ingest_live(work, args.ingest_events // 8, 4)
        results["import_flightlog"] = bench_import()
        fl = lat["flightlog"]
        results["targets"] = {
            "p50_le_1.5us": fl["p50_us"] <= 1.5, "p99_le_10us": fl["p99_us"] <= 10.0,
            "100x_faster_than_fastest_peer": results["log_metrics_ratio"]["peer_p50_over_flightlog_p50"] >= 100,
            "ingest_ge_2M_per_s": results["ingest_prefilled_ring_to_wal"]["events_per_second"] >= 2e6,
            "import_le_100ms": results["import_flightlog"]["median_ms"] <= 100,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
