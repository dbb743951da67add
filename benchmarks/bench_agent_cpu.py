"""The agent's CPU at the rates people actually log, printed as JSON: one metric per ``log_metrics`` call,
paced, from one trainer and from four (the rate is the total over the trainers), and idle; next to the
real wandb library's service process (``wandb-core``, offline) at the same row rates in the same run; and
the delivery latency (log call to the local store's commit, the store polled every 20 ms).

Measured per component so a change to one side can be told from the other:
- ``agent``: the full agent (``python -m flightlog.agent``: ingest, WAL, every sink runner, monitor);
- ``ingest_only``: only the doorbell-driven ingest loop, the WAL and its group commit (100 ms), in a process of
  its own;
- ``wandb_core``: the sum over the ``wandb-core`` processes the trainers' ``wandb.init(mode="offline")`` start.
CPU is % of one core (user + system, from psutil) over the window; ``events_per_s`` is what the trainers
achieved.

Usage: python benchmarks/bench_agent_cpu.py [--quick] [--window 5] [--rates 10,100,1000,10000]
       [--trainers 1,4] [--only agent,ingest_only,wandb_core]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from flightlog.proto.errors import FlightlogError

HERE = Path(__file__).resolve()


# --- child processes ---------------------------------------------------------------------------------

def trainer_main(argv: list[str]) -> int:
    """A paced trainer: init, say ready, wait for go, log ``rate`` rows/s for ``seconds``, report."""
    backend, rate, seconds, work = argv[0], float(argv[1]), float(argv[2]), Path(argv[3])
    me = uuid.uuid4().hex[:8]
    if backend == "wandb":
        import wandb

        run = wandb.init(project="bench", mode="offline", dir=str(work), settings=wandb.Settings(silent=True))
        log = run.log
        finish = run.finish
    else:
        import flightlog

        t = flightlog.ExperimentTracker("cpu-bench", {"tracking": {"use_tensorboard": False},
                                                       "agent": {"autostart": False}}, run_id=f"cpu-{me}")
        log = t.log_metrics
        finish = t.finish
    (work / f"ready-{me}").touch()
    go = work / "go"
    while not go.exists():
        time.sleep(0.005)
    start = time.monotonic()
    end = start + seconds
    i = 0
    # Pace in small bursts: what should have been logged by now, then a 1 ms nap (sleeping per event
    # would cap the rate at the timer's resolution).
    while (now := time.monotonic()) < end:
        due = int((now - start) * rate) + 1
        while i < due:
            log({"loss": 1.0 / (i + 1)})
            i += 1
        time.sleep(min(0.001, 1.0 / rate))
    elapsed = time.monotonic() - start
    finish()
    (work / f"done-{me}.json").write_text(json.dumps({"events": i, "seconds": elapsed}))
    return 0


def ingest_only_main(argv: list[str]) -> int:
    """Only the ingest side: rings -> doorbell-driven ingest loop -> WAL (group commit), no sinks."""
    import anyio

    from flightlog.agent.doorbell import Doorbell
    from flightlog.agent.ingest import Ingestor
    from flightlog.agent.ingest_loop import IngestLoop
    from flightlog.agent.wal import WAL
    from flightlog.proto.paths import ensure_private_dir, resolve_paths

    paths = resolve_paths()
    ensure_private_dir(paths.ring_dir.parent)
    ensure_private_dir(paths.ring_dir)
    wal = WAL(paths.wal_dir, fsync="interval")
    ing = Ingestor(wal, paths.ring_dir)
    loop = IngestLoop(ing, Doorbell(paths.doorbell), paths.wal_dir, lambda: None, fsync_every=0.1,
                      on_ingested_threadsafe=True)  # as the agent runs it

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                Path(argv[0]).touch()  # noqa: ASYNC240 - once, before serving
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

    anyio.run(main)
    loop.doorbell.close()
    ing.close()
    wal.close()
    return 0


# --- the harness ---------------------------------------------------------------------------------------

def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class Service:
    """The process under measurement (an agent, the ingest-only loop), on its own data dir and socket."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.work = work
        self.env = dict(os.environ)
        self.env["FLIGHTLOG_DATA_DIR"] = str(work / "data")
        self.env["FLIGHTLOG_AGENT_SOCKET"] = str(Path(tempfile.mkdtemp(prefix="flc-")) / "a.sock")
        (work / "data").mkdir(mode=0o700, parents=True)
        ready = work / "service-ready"
        if kind == "agent":
            cmd = [sys.executable, "-m", "flightlog.agent", "--data-dir", str(work / "data"),
                   "--socket", self.env["FLIGHTLOG_AGENT_SOCKET"]]
        else:
            cmd = [sys.executable, str(HERE), "--ingest-only-service", str(ready)]
        self.log = open(work / "service.log", "wb")  # noqa: SIM115 -- open while the service runs; stop() closes it
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if kind == "agent" and Path(self.env["FLIGHTLOG_AGENT_SOCKET"]).exists():
                break
            if kind != "agent" and ready.exists():
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {(work / 'service.log').read_text()}")
            time.sleep(0.05)
        time.sleep(1.0)  # let start-up work (imports, first scans) settle out of the measurement
        self.ps = psutil.Process(self.proc.pid)

    def wakeups(self) -> int | None:
        if self.kind != "agent":
            return None
        old = dict(os.environ)
        os.environ.update(self.env)
        try:
            from flightlog.proto.control import connect
            from flightlog.proto.events import StatusRequest
            from flightlog.proto.paths import resolve_paths

            client = connect(resolve_paths())
            if client is None:
                return None
            try:
                return int(client.request(StatusRequest()).data.get("ingest_wakeups", 0))
            finally:
                client.close()
        finally:
            os.environ.clear()
            os.environ.update(old)

    def store(self) -> Path:
        return self.work / "data" / "flightlog.db"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class LatencyProbe(threading.Thread):
    """Polls the local store every 20 ms; a point's latency is the poll that first saw it minus its timestamp."""

    def __init__(self, store: Path, since: float) -> None:
        super().__init__(daemon=True)
        self.store, self.since = store, since
        self.latencies: list[float] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        seen: dict[str, int] = {}  # run -> points of 'loss' already counted
        store = None
        while not self.stop_flag.wait(0.02):
            try:
                if store is None:
                    if not self.store.exists():
                        continue
                    from flightlog.agent.store import Store

                    store = Store(self.store, readonly=True)
                    seen = {r.run_id: store.metric_count(r.run_id, "loss") for r in store.run_states()}
                fresh: list[float] = []
                for r in store.run_states():
                    n = store.metric_count(r.run_id, "loss")
                    if n > seen.get(r.run_id, 0):  # a trainer's steps only grow: the newest points are the last
                        fresh += store.metric_arrays(r.run_id, "loss")[1][seen.get(r.run_id, 0):].tolist()
                        seen[r.run_id] = n
            except (sqlite3.Error, FlightlogError):
                continue
            now = time.time()
            self.latencies += [now - ts for ts in fresh if ts >= self.since]
        if store is not None:
            store.close()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q))], 4)


def measure(system: str, trainers: int, rate: float, window: float, work: Path,
            service: Service | None, warm: float = 3.0) -> dict[str, Any]:
    """Start ``trainers`` paced trainers (``rate`` rows/s in total), measure the CPU over ``window`` once
    they have logged for ``warm`` seconds (a run's one-time start-up work, which wandb-core does before
    ``wandb.init`` returns and flightlog's agent after, is not the rate's cost)."""
    run_dir = work / f"{system}-{trainers}x{int(rate)}-{uuid.uuid4().hex[:4]}"
    run_dir.mkdir()
    backend = "wandb" if system == "wandb_core" else "flightlog"
    env = service.env if service is not None else dict(os.environ)
    tail = 0.5
    procs = [subprocess.Popen([sys.executable, str(HERE), "--trainer", backend, str(rate / trainers),
                               str(warm + window + tail), str(run_dir)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(trainers)]
    deadline = time.monotonic() + 120
    while len(list(run_dir.glob("ready-*"))) < trainers:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            errs = [p.stderr.read().decode()[-2000:] for p in procs if p.poll() is not None and p.stderr]
            raise RuntimeError(f"{system} trainers did not get ready: {errs}")
        time.sleep(0.02)
    if service is not None:
        watched = [service.ps]
    else:
        watched = [c for p in procs for c in psutil.Process(p.pid).children(recursive=True)
                   if "wandb-core" in " ".join(c.cmdline()) or "wandb-core" in c.name()]
    probe = None
    if service is not None and service.kind == "agent":
        probe = LatencyProbe(service.store(), time.time() + warm)
        probe.start()
    (run_dir / "go").touch()
    time.sleep(warm)
    wake0 = service.wakeups() if service is not None else None
    c0, t0 = cpu_seconds(watched), time.monotonic()
    time.sleep(window)
    c1, t1 = cpu_seconds(watched), time.monotonic()
    wake1 = service.wakeups() if service is not None else None
    for p in procs:
        _, err = p.communicate(timeout=180)
        if p.returncode:
            raise RuntimeError(f"{system} trainer failed: {err.decode()[-2000:]}")
    done = [json.loads(f.read_text()) for f in run_dir.glob("done-*.json")]
    events = sum(d["events"] for d in done)
    seconds = max(d["seconds"] for d in done)
    out: dict[str, Any] = {
        "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 2),
        "events_per_s": round(events / seconds, 1),
        "processes": len(watched),
    }
    if wake0 is not None and wake1 is not None:
        out["doorbell_wakeups_per_s"] = round((wake1 - wake0) / (t1 - t0), 1)
    if probe is not None:
        time.sleep(1.0)  # the last rows of the window land
        probe.stop_flag.set()
        probe.join()
        out["latency_p50_s"] = pct(probe.latencies, 0.5)
        out["latency_p99_s"] = pct(probe.latencies, 0.99)
        out["latency_samples"] = len(probe.latencies)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def idle(service: Service, window: float) -> dict[str, Any]:
    c0, t0 = cpu_seconds([service.ps]), time.monotonic()
    time.sleep(window)
    c1, t1 = cpu_seconds([service.ps]), time.monotonic()
    return {"cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 2), "seconds": round(t1 - t0, 1)}


GOALS_ONE_TRAINER = {10: 0.5, 100: 1.0, 1000: 3.0, 10000: 10.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short windows (about two minutes in all)")
    ap.add_argument("--window", type=float, default=None, help="seconds of CPU measured per row (default 5)")
    ap.add_argument("--idle-window", type=float, default=None)
    ap.add_argument("--rates", default="10,100,1000,10000")
    ap.add_argument("--trainers", default="1,4")
    ap.add_argument("--only", default="agent,ingest_only,wandb_core")
    ap.add_argument("--warm", type=float, default=3.0, help="seconds of logging before each window (default 3)")
    args = ap.parse_args()
    window = args.window or (2.0 if args.quick else 5.0)
    idle_window = args.idle_window or (3.0 if args.quick else 10.0)
    rates = [float(r) for r in args.rates.split(",")]
    trainer_counts = [int(n) for n in args.trainers.split(",")]
    systems = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="fl-cpu-"))
    result: dict[str, Any] = {"window_s": window, "warm_s": args.warm, "cpus": os.cpu_count(), "rate_is": "total rows/s over the trainers",
                              "goals_one_trainer_cpu_percent": GOALS_ONE_TRAINER, "idle": {}, "rows": []}
    services: dict[str, Service] = {}
    try:
        for system in systems:
            if system in ("agent", "ingest_only"):
                services[system] = Service(system, work / system)
                result["idle"][system] = idle(services[system], idle_window)
        for n in trainer_counts:
            for rate in rates:
                row: dict[str, Any] = {"trainers": n, "rate": rate}
                for system in systems:
                    row[system] = measure(system, n, rate, window, work, services.get(system), args.warm)
                if "agent" in row and "wandb_core" in row:
                    row["agent_below_wandb_core"] = row["agent"]["cpu_percent"] < row["wandb_core"]["cpu_percent"]
                result["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        for system, svc in services.items():
            result["idle"][system + "_after"] = idle(svc, idle_window)
    finally:
        for svc in services.values():
            svc.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trainer":
        sys.exit(trainer_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--ingest-only-service":
        sys.exit(ingest_only_main(sys.argv[2:]))
    main()
