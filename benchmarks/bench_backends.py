"""Backend sinks versus their peers, in one run, printed as JSON.

* MLflow: time until N metric points are in a local `mlflow server` (sqlite store): through flightlog (SDK ->
  agent -> WAL -> MLflow sink), through ``mlflow.log_metrics(..., synchronous=False)``, and through a bare loop of
  1000-metric ``MlflowClient.log_batch`` calls (the server's ceiling); plus ``wal replay`` into MLflow.
* TensorBoard: the sink's scalars/s versus tensorboardX ``add_scalar``; plus ``wal replay`` into TensorBoard.
* W&B (offline): the sink's rows/s versus ``wandb.log``.

    python benchmarks/bench_backends.py [--n 100000] [--only mlflow,tensorboard,wandb]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
KEYS = [f"metric_{i}" for i in range(10)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Any, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)


def _events(run_id: str, name: str, tracking: dict[str, Any], n_points: int) -> list[Any]:
    from flightlog.proto.events import HyperParams, Metrics, RunEnd, RunStart

    steps = n_points // len(KEYS)
    t0 = time.time()
    evs: list[Any] = [RunStart(run_id=run_id, name=name, timestamp=t0, config={"tracking": tracking}),
                      HyperParams(run_id, {"lr": 0.1}, t0)]
    evs += [Metrics(run_id, s, t0 + s * 1e-3, {k: s * 0.5 + i for i, k in enumerate(KEYS)}) for s in range(steps)]
    evs.append(RunEnd(run_id, "completed", t0 + steps))
    return evs


def _write_wal(wal_dir: Path, events: list[Any]) -> None:
    from flightlog.agent.wal import WAL
    from flightlog.proto.codec import encode_event
    from flightlog.proto.frames import append_frame

    with WAL(wal_dir, fsync="never") as wal:
        for i in range(0, len(events), 1000):
            buf = bytearray()
            chunk = events[i:i + 1000]
            for ev in chunk:
                append_frame(buf, encode_event(ev))
            wal.append(buf, len(chunk), "bench")


# --- MLflow ----------------------------------------------------------------------------------------


class _Server:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Server:
        import urllib.request

        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait(up, 120, "mlflow server start", 0.2)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def bench_mlflow(n: int, root: Path) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    out: dict[str, Any] = {"points": n}
    steps = n // len(KEYS)
    with _Server(root) as server:
        client = MlflowClient(server.uri)

        # 1. bare log_batch loop: the server's ceiling
        exp = client.create_experiment("bare")
        run = client.create_run(exp)
        ts = int(time.time() * 1000)
        pts = [Metric(k, s * 0.5 + i, ts + s, s) for s in range(steps) for i, k in enumerate(KEYS)]
        t0 = time.perf_counter()
        for i in range(0, len(pts), 1000):
            client.log_batch(run.info.run_id, metrics=pts[i:i + 1000])
        bare = time.perf_counter() - t0
        out["log_batch_loop"] = {"seconds": round(bare, 3), "points_per_s": round(n / bare)}

        def bare_again() -> float:
            run = client.create_run(exp)
            t0 = time.perf_counter()
            for i in range(0, len(pts), 1000):
                client.log_batch(run.info.run_id, metrics=pts[i:i + 1000])
            return time.perf_counter() - t0

        # 2. mlflow.log_metrics(..., synchronous=False)
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_experiment("async")
        t0 = time.perf_counter()
        with mlflow.start_run():
            for s in range(steps):
                mlflow.log_metrics({k: s * 0.5 + i for i, k in enumerate(KEYS)}, step=s, synchronous=False)
            call_done = time.perf_counter() - t0
        peer = time.perf_counter() - t0  # end_run waits until the async queue is flushed
        out["mlflow_log_metrics_async"] = {"seconds": round(peer, 3), "points_per_s": round(n / peer),
                                           "logging_calls_seconds": round(call_done, 3)}

        # 3. flightlog: SDK -> agent -> WAL -> MLflow sink
        data = root / "agent"
        sock_dir = Path(tempfile.mkdtemp(prefix="flb-", dir="/tmp"))
        env = dict(os.environ, FLIGHTLOG_DATA_DIR=str(data), FLIGHTLOG_AGENT_SOCKET=str(sock_dir / "a.sock"))
        os.environ.update(FLIGHTLOG_DATA_DIR=env["FLIGHTLOG_DATA_DIR"],
                          FLIGHTLOG_AGENT_SOCKET=env["FLIGHTLOG_AGENT_SOCKET"])
        agent = subprocess.Popen([sys.executable, "-m", "flightlog.agent", "--data-dir", str(data), "--socket",
                                  str(sock_dir / "a.sock")], env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(root / "agent.log", "ab"))
        try:
            import flightlog
            from flightlog.proto.control import connect
            from flightlog.proto.paths import resolve_paths

            paths = resolve_paths()

            def agent_up() -> bool:
                c = connect(paths, timeout=1.0)
                if c is not None:
                    c.close()
                return c is not None

            _wait(agent_up, 30, "agent start")
            def through_flightlog(experiment: str) -> dict[str, Any]:
                cfg = {"tracking": {"use_tensorboard": False, "use_mlflow": True, "mlflow_tracking_uri": server.uri,
                                    "mlflow_experiment_name": experiment}, "agent": {"autostart": False}}
                t0 = time.perf_counter()
                tracker = flightlog.ExperimentTracker("flightlog-bench", cfg)
                for s in range(steps):
                    tracker.log_metrics({k: s * 0.5 + i for i, k in enumerate(KEYS)}, step=s)
                call_done = time.perf_counter() - t0
                tracker.finish()

                def finished() -> bool:
                    exp = client.get_experiment_by_name(experiment)
                    runs = client.search_runs([exp.experiment_id]) if exp else []
                    return bool(runs) and runs[0].info.status == "FINISHED"

                try:
                    _wait(finished, 600, "flightlog delivery", 0.1)
                except TimeoutError as exc:
                    raise TimeoutError(f"flightlog delivery; agent log: {(root / 'agent.log').read_text()[-3000:]}") from exc
                fl = time.perf_counter() - t0
                exp = client.get_experiment_by_name(experiment)
                runs = client.search_runs([exp.experiment_id])
                got = len(client.get_metric_history(runs[0].info.run_id, KEYS[-1])) * len(KEYS)
                return {"seconds": round(fl, 3), "points_per_s": round(n / fl), "points_in_mlflow": got,
                        "logging_calls_seconds": round(call_done, 3)}

            # A fresh agent imports mlflow and creates its client on the first run; a node daemon has done so.
            out["flightlog_cold_agent"] = through_flightlog("flightlog-cold")
            out["flightlog"] = through_flightlog("flightlog")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
            shutil.rmtree(sock_dir, ignore_errors=True)

        # 4. wal replay into MLflow
        from flightlog.agent.replay import make_sink, replay

        wal = root / "replay-wal"
        _write_wal(wal, _events("replayml", "replay", {}, n))
        sink = make_sink("mlflow", server.uri, root / "replay-state")
        t0 = time.perf_counter()
        res = replay(wal, sink, root / "replay-state", progress=False)
        rp = time.perf_counter() - t0
        out["wal_replay"] = {"seconds": round(rp, 3), "points_per_s": round(n / rp), "events": res.events}
        # The sqlite-backed server's speed drifts as its tables grow: measure the ceiling again at the end.
        after = bare_again()
        out["log_batch_loop_after"] = {"seconds": round(after, 3), "points_per_s": round(n / after)}
        bare = min(bare, after)
    out["flightlog_speedup_vs_async"] = round(peer / out["flightlog"]["seconds"], 2)
    out["flightlog_fraction_of_log_batch_ceiling"] = round(out["flightlog"]["points_per_s"] / (n / bare), 3)
    out["replay_fraction_of_log_batch_ceiling"] = round(out["wal_replay"]["points_per_s"] / (n / bare), 3)
    return out


# --- TensorBoard -----------------------------------------------------------------------------------


def bench_tensorboard(n: int, root: Path) -> dict[str, Any]:
    from tensorboardX import SummaryWriter

    from flightlog.agent.replay import make_sink, replay
    from flightlog.agent.sinks import Batch, SinkCursor, TensorBoardTracker

    out: dict[str, Any] = {"scalars": n}
    evs = _events("tb", "tb-bench", {"tensorboard_log_dir": str(root / "tb-sink")}, n)
    sink = TensorBoardTracker(root / "tb-state")
    sink.open()
    items = list(enumerate(evs))
    t0 = time.perf_counter()
    for i in range(0, len(items), sink.batch_size):
        sink.write(Batch(items[i:i + sink.batch_size], SinkCursor(0, 0, i)))
    sink.close()
    dt = time.perf_counter() - t0
    out["sink"] = {"seconds": round(dt, 3), "scalars_per_s": round(n / dt)}

    steps = n // len(KEYS)
    t0 = time.perf_counter()
    w = SummaryWriter(str(root / "tb-peer"))
    for s in range(steps):
        for i, k in enumerate(KEYS):
            w.add_scalar(k, s * 0.5 + i, s)
    w.close()  # waits until everything is on disk
    dt = time.perf_counter() - t0
    out["tensorboardX_add_scalar"] = {"seconds": round(dt, 3), "scalars_per_s": round(n / dt)}

    wal = root / "tb-wal"
    _write_wal(wal, _events("tbr", "tb-replay", {}, n))
    rsink = make_sink("tensorboard", str(root / "tb-replay"), root / "tb-replay-state")
    t0 = time.perf_counter()
    replay(wal, rsink, root / "tb-replay-state", progress=False)
    dt = time.perf_counter() - t0
    out["wal_replay"] = {"seconds": round(dt, 3), "scalars_per_s": round(n / dt)}
    out["sink_speedup_vs_add_scalar"] = round(out["sink"]["scalars_per_s"] / out["tensorboardX_add_scalar"]["scalars_per_s"], 2)
    return out


# --- W&B -------------------------------------------------------------------------------------------


def bench_wandb(rows: int, root: Path) -> dict[str, Any]:
    import wandb

    from flightlog.agent.sinks import Batch, SinkCursor, WandBTracker

    out: dict[str, Any] = {"rows": rows, "values_per_row": len(KEYS)}
    evs = _events("wbbench", "wb-sink", {"wandb_mode": "offline", "wandb_dir": str(root / "wb")},
                  rows * len(KEYS))
    sink = WandBTracker(root / "wb-state")
    sink.open()
    items = list(enumerate(evs))
    t0 = time.perf_counter()
    for i in range(0, len(items), sink.batch_size):
        sink.write(Batch(items[i:i + sink.batch_size], SinkCursor(0, 0, i)))
    dt = time.perf_counter() - t0
    sink.close()
    out["sink"] = {"seconds": round(dt, 3), "rows_per_s": round(rows / dt)}

    t0 = time.perf_counter()
    run = wandb.init(project="bench", mode="offline", dir=str(root / "wb"), reinit="create_new",
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    for s in range(rows):
        run.log({k: s * 0.5 + i for i, k in enumerate(KEYS)}, step=s)
    run.finish()
    dt = time.perf_counter() - t0
    wandb.teardown()
    out["wandb_log"] = {"seconds": round(dt, 3), "rows_per_s": round(rows / dt)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="metric points / scalars (default 100000)")
    p.add_argument("--wandb-rows", type=int, default=5000, help="W&B history rows (10 values each)")
    p.add_argument("--only", default="mlflow,tensorboard,wandb")
    args = p.parse_args()
    which = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="flightlog-bench-"))
    result: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        if "tensorboard" in which:
            result["tensorboard"] = bench_tensorboard(args.n, root)
        if "wandb" in which:
            result["wandb_offline"] = bench_wandb(args.wandb_rows, root)
        if "mlflow" in which:
            result["mlflow"] = bench_mlflow(args.n, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
