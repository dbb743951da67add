"""The local store's figures, printed as JSON, peers side by side in one run:

- ``sink_cpu``: CPU of the agent's store sink (its runner on the one delivery engine: WAL read, decode, apply,
  commit with the cursor) delivering a pre-filled WAL, for the row-per-value store of ``--old-commit`` (its
  ``agent/store.py`` from git) and the chunk store of this tree, next to a sink that acks and forgets (what the
  engine's WAL read, decode and cursor commits cost alone). ``cores_at_500k`` is CPU seconds per 500,000
  events: the share of a core the sink needs at 0.5 M events/s; ``store_cores_at_500k`` the part above the
  null sink (the store's own).
  ``write_cores_at_500k``: the CPU inside the sink's ``write`` alone (apply and the commit), per 500,000 events.
- ``read``: the same series read back (``metric_series``, export, and the chunk store's ``metric_arrays`` and
  ``metric_envelope``), seconds of wall time.
- ``freshness``: a real agent (local store, TensorBoard and MLflow sinks; a real ``mlflow server`` on SQLite with
  ``--mlflow-workers`` worker processes, 2 by default, started and left to settle before anything else runs), a
  paced trainer at ``--fresh-rate`` events/s; each backend polled every 10 ms by its own reader in its own
  process (the Store, TensorBoard's EventAccumulator, MlflowClient.get_run): a step's freshness is the first poll
  that saw it minus the moment its ``log_metrics`` returned. p50/p99/max per backend, measured once the run
  exists in every backend (steady state: the agent's one-time import of mlflow is not in it). Next to them, what
  bounds them: each process's share of a core while the trainer logs, each reader's own read times, the
  TensorBoard reader's ceiling (EventAccumulator parsing the run's file from the start), the MLflow server's CPU
  per point.

With ``--base-commit C`` sink_cpu also runs the chunk store of commit C (its store modules from git), in turn
with the others each repeat: ``chunk_vs_base_store_part`` is this tree's store part over C's, and
``chunks_identical_to_base`` whether both wrote the very same chunk rows (bytes included).

Usage: python benchmarks/bench_store.py [--quick] [--events N] [--only sink_cpu,read,freshness]
       [--fresh-rate 10000] [--fresh-seconds 5] [--mlflow-workers 2] [--old-commit 5af902f]
       [--base-commit 32bf951] [--repeats 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
CORES_AT = 500_000
GOALS = {"store_cores_at_500k": 0.2, "freshness_p99_s": {"store": 0.5, "tensorboard": 1.0, "mlflow": 2.0}}


# --- the sink's CPU -----------------------------------------------------------------------------------------------

def old_store_module(commit: str) -> types.ModuleType:
    """``agent/store.py`` of ``commit`` as a module of its own (it imports only flightlog.proto)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:agent/store.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="fl-oldstore-")) / "old_store.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("flightlog_old_store", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def chunk_store_sink(commit: str) -> type:
    """The store sink class of ``commit`` on that commit's chunk store (``agent/store_chunks.py``,
    ``agent/store.py``, ``agent/sinks/store.py`` from git, loaded as modules of their own): the baseline the
    chunk store of this tree is measured against in the same run (``--base-commit``)."""
    def load(path: str, name: str, subs: dict[str, str]) -> types.ModuleType:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True,
                             capture_output=True, text=True).stdout
        for a, b in subs.items():
            src = src.replace(a, b)
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        exec(compile(src, f"{commit}:{path}", "exec"), mod.__dict__)
        return mod

    load("agent/store_chunks.py", "flightlog_base_chunks", {})
    load("agent/store.py", "flightlog_base_store", {
        "from flightlog.agent import store_chunks as _chunks": "import flightlog_base_chunks as _chunks",
        "from flightlog.agent.store_chunks import": "from flightlog_base_chunks import"})
    sink = load("agent/sinks/store.py", "flightlog_base_sink", {
        "from flightlog.agent.store import Store": "from flightlog_base_store import Store",
        "from ._errors import": "from flightlog.agent.sinks._errors import",
        "from .base import": "from flightlog.agent.sinks.base import"})
    cls: type = sink.LocalStoreSink
    return cls


def fill_wal(wal_dir: Path, n: int, keys: int) -> None:
    from flightlog.agent.wal import WAL
    from flightlog.proto import encode_event
    from flightlog.proto.events import Metrics, RunStart
    from flightlog.proto.frames import append_frame

    rnd = random.Random(0)
    names = ["loss", "acc", "lr", "grad_norm", *(f"m{i}" for i in range(keys))][:keys]
    with WAL(wal_dir, fsync="never") as wal:
        buf = bytearray()
        append_frame(buf, encode_event(RunStart("bench", "bench", 1.7e9)))
        wal.append(buf, 1, "bench")
        t0 = 1.7e9
        for start in range(0, n, 500):  # records of 500 frames, as a busy ring drains
            buf = bytearray()
            count = min(500, n - start)
            for i in range(start, start + count):
                append_frame(buf, encode_event(Metrics("bench", i, t0 + i * 2e-6, {k: rnd.random() for k in names})))
            wal.append(buf, count, "bench")


def sink_cpu(work: Path, n: int, keys: int, old: types.ModuleType, repeats: int,
             base_sink: type | None = None) -> dict[str, Any]:
    import anyio

    from flightlog.agent.runner import CursorStore, SinkRunner
    from flightlog.agent.sinks.store import LocalStoreSink
    from flightlog.agent.wal import WALReader

    class RowStoreSink(LocalStoreSink):
        """The store sink on the row-per-value Store of the old commit (same write path otherwise)."""

        def open(self) -> Any:
            self._store = old.Store(self.path)
            saved = self._store.load_cursor(self.name)
            from flightlog.agent.sinks.base import SinkCursor

            return SinkCursor(*saved) if saved else SinkCursor()

    class NullSink:
        """Acks and forgets: what the engine (WAL read, decode, batching, cursor commits) costs alone."""

        name, batch_size, all_runs = "null", LocalStoreSink.batch_size, True

        def open(self) -> None:
            return None

        def write(self, batch: Any) -> Any:
            from flightlog.agent.sinks.base import Ack

            return Ack(delivered=len(batch.events))

        def close(self) -> None:
            pass

    class RowCursorStore(CursorStore):
        """The runner's cursor store on the old Store too (the new one would migrate the rows away)."""

        def _db(self) -> Any:
            if self._store is None:
                self._store = old.Store(self.path)
            return self._store

    wal_dir = work / f"wal-{keys}"
    fill_wal(wal_dir, n, keys)
    out: dict[str, Any] = {"events": n, "values_per_event": keys}
    peers = ["null", "row_store", "chunk_store", *(["base_chunk_store"] if base_sink is not None else [])]
    for r in range(repeats):  # the peers in turn, each repeat: a drifting load touches them all alike
        for peer in peers:
            db = work / f"{peer}-{keys}-{r}.db"
            sink: Any = (NullSink() if peer == "null" else RowStoreSink(db) if peer == "row_store" else
                         LocalStoreSink(db) if peer == "chunk_store" else base_sink(db))  # type: ignore[misc]
            cursors = RowCursorStore(db) if peer == "row_store" else CursorStore(db)
            write_cpu = _time_writes(sink)
            runner = SinkRunner(sink, WALReader(wal_dir), cursors, until_caught_up=True)
            c0, t0 = time.process_time(), time.perf_counter()
            anyio.run(runner.run)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            row = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "us_per_event": round(1e6 * cpu / n, 3),
                   "cores_at_500k": round(cpu * CORES_AT / n, 3), "db": str(db), "cpu_s_all": [round(cpu, 3)],
                   "write_cores_at_500k": round(write_cpu[0] * CORES_AT / n, 3)}
            if db.exists():
                row["db_bytes"] = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
            best = out.get(peer)
            if best is not None:
                row["cpu_s_all"] = [*best["cpu_s_all"], *row["cpu_s_all"]]
            if best is None or row["cpu_s"] < best["cpu_s"]:
                out[peer] = row
            else:
                best["cpu_s_all"] = row["cpu_s_all"]
    base = out["null"]["cpu_s"]
    for peer in peers[1:]:
        out[peer]["store_cores_at_500k"] = round(max(0.0, out[peer]["cpu_s"] - base) * CORES_AT / n, 3)
    if base_sink is not None:  # the store's own part against the base commit's, and the very same chunks
        out["chunk_vs_base_store_part"] = round(out["chunk_store"]["store_cores_at_500k"]
                                                / max(1e-9, out["base_chunk_store"]["store_cores_at_500k"]), 3)
        out["chunks_identical_to_base"] = _chunk_rows(out["chunk_store"]["db"]) == _chunk_rows(
            out["base_chunk_store"]["db"])
    out["chunk_vs_row_cpu"] = round(out["chunk_store"]["cpu_s"] / out["row_store"]["cpu_s"], 3)
    out["chunk_vs_row_store_part"] = round(out["chunk_store"]["store_cores_at_500k"]
                                           / max(1e-9, out["row_store"]["store_cores_at_500k"]), 3)
    out["chunk_vs_row_bytes"] = round(out["chunk_store"]["db_bytes"] / out["row_store"]["db_bytes"], 3)
    return out


def _time_writes(sink: Any) -> list[float]:
    """The CPU seconds of the sink thread inside ``sink.write`` (apply, commit with the cursor), counted into
    the list returned: the store's own work without the engine's around it (steadier on a loaded machine)."""
    spent = [0.0]
    write = sink.write

    def timed(batch: Any) -> Any:
        c0 = time.thread_time()
        try:
            return write(batch)
        finally:
            spent[0] += time.thread_time() - c0

    sink.write = timed
    return spent


def _chunk_rows(db: str) -> list[tuple[Any, ...]]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("SELECT * FROM metric_chunks ORDER BY run_id, key, seq").fetchall()


def read_bench(cpu: dict[str, Any], old: types.ModuleType) -> dict[str, Any]:
    from flightlog.agent.store import Store

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return round(time.perf_counter() - t0, 4)

    out: dict[str, Any] = {"points": cpu["events"]}
    with old.Store(cpu["row_store"]["db"], readonly=True) as ro:
        out["row_store"] = {"metric_series_s": timed(lambda: ro.metric_series("bench", "loss")),
                            "export_s": timed(lambda: list(ro.metric_points("bench", "loss")))}
    with Store(cpu["chunk_store"]["db"], readonly=True) as st:
        out["chunk_store"] = {"metric_series_s": timed(lambda: st.metric_series("bench", "loss")),
                              "export_s": timed(lambda: list(st.metric_points("bench", "loss"))),
                              "metric_arrays_s": timed(lambda: st.metric_arrays("bench", "loss")),
                              "metric_envelope_1000_s": timed(lambda: st.metric_envelope("bench", "loss", 1000))}
        same = list(st.metric_points("bench", "loss"))
    with old.Store(cpu["row_store"]["db"], readonly=True) as ro:
        out["export_identical"] = same == list(ro.metric_points("bench", "loss"))
    out["series_speedup"] = round(out["row_store"]["metric_series_s"] / out["chunk_store"]["metric_series_s"], 2)
    return out


# --- freshness ----------------------------------------------------------------------------------------------------

def fresh_trainer(argv: list[str]) -> int:
    """A paced trainer logging {"loss": step}; writes its run id, then every log call's return time."""
    rate, seconds, work, cfg = float(argv[0]), float(argv[1]), Path(argv[2]), json.loads(argv[3])
    import flightlog

    t = flightlog.ExperimentTracker("fresh", cfg)
    (work / "run_id").write_text(t.run_id)
    while not (work / "go").exists():
        time.sleep(0.005)
    returned: list[float] = []
    cpu0 = time.process_time()
    start = time.monotonic()
    i = 0
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate) + 1
        while i < due:
            t.log_metrics({"loss": float(i)}, step=i)
            returned.append(time.time())
            i += 1
        time.sleep(0.001)
    (work / "trainer.json").write_text(json.dumps({"cpu_s": time.process_time() - cpu0}))
    (work / "returned.tmp").write_text(json.dumps(returned))
    (work / "returned.tmp").replace(work / "returned.json")  # the readers never see half of it
    t.finish()
    return 0


def poller(argv: list[str]) -> int:
    """Poll one backend every 10 ms for the highest step of ``loss`` it shows; write (time, step) changes."""
    kind, target, work = argv[0], argv[1], Path(argv[2])
    stop, seen = work / "stop-polling", [(0.0, -1)]
    reads: list[float] = []  # how long each read took: the reader's own share of a point's delay
    read: Any = None
    last: int | None = None  # the trainer's last step, once it wrote its return times
    while not stop.exists() and (last is None or seen[-1][1] < last):
        if last is None and (work / "returned.json").exists():
            last = len(json.loads((work / "returned.json").read_text())) - 1
        time.sleep(0.01)
        run_id = (work / "run_id").read_text() if (work / "run_id").exists() else None
        if run_id is None:
            continue
        try:
            if read is None:
                read = _reader(kind, target, run_id)
                if read is None:
                    continue
                (work / f"ready-{kind}").touch()  # the run exists there: the backend's one-time set-up is over
            t0 = time.perf_counter()
            step = read()
            reads.append(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - a backend not ready yet (no file, no run): poll again
            continue
        if step is not None and step > seen[-1][1]:
            seen.append((time.time(), int(step)))
    (work / f"reader-{kind}.json").write_text(json.dumps({
        "polls": len(reads), "cpu_s": round(time.process_time(), 3), "read_p50_s": _pct(reads, 0.5),
        "read_p99_s": _pct(reads, 0.99), "read_max_s": round(max(reads), 4) if reads else None}))
    (work / f"seen-{kind}.json").write_text(json.dumps(seen[1:]))
    return 0


def _reader(kind: str, target: str, run_id: str) -> Any:
    if kind == "store":
        from flightlog.agent.store import Store

        if not Path(target).exists():
            return None
        store = Store(target, readonly=True)
        return lambda: store.last_step(run_id)
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        dirs = list(Path(target).glob(f"*-{run_id}"))
        if not dirs:
            return None
        acc = EventAccumulator(str(dirs[0]), size_guidance={"scalars": 1000})

        def tb() -> int | None:
            acc.Reload()
            return acc.Scalars("loss")[-1].step if "loss" in acc.Tags()["scalars"] else None

        return tb
    from mlflow.tracking import MlflowClient

    c = MlflowClient(target)
    exp = c.get_experiment_by_name("fresh")
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`flightlog.run_id` = '{run_id}'", max_results=1)
    if not runs:
        return None
    ml_id = runs[0].info.run_id

    def ml() -> int | None:
        v = c.get_run(ml_id).data.metrics.get("loss")
        return None if v is None else int(v)

    return ml


def _mlflow_server(root: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "mlflow.log", "ab")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("mlflow server did not come up")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q))], 4)


class _Cpu:
    """CPU seconds (user + system) of processes and their children, between two reads."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = self.read()

    def read(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for name, proc in self.procs.items():
            total = 0.0
            try:
                for p in [proc, *proc.children(recursive=True)]:
                    t = p.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                pass
            out[name] = total
        return out

    def since_start(self) -> dict[str, float]:
        now = self.read()
        return {name: round(now[name] - self.start[name], 3) for name in now}


def _settle(cpu: _Cpu, name: str, limit_s: float = 90.0) -> float:
    """Wait until ``name``'s processes use under 10 % of a core over a second (the MLflow server's job
    workers import for tens of seconds after /health answers, on the cores the measurement needs): seconds
    waited."""
    t0 = time.monotonic()
    last = cpu.read()[name]
    while time.monotonic() - t0 < limit_s:
        time.sleep(1.0)
        now = cpu.read()[name]
        if now - last < 0.1:
            break
        last = now
    return round(time.monotonic() - t0, 1)


def _tb_reader_ceiling(tb_dir: Path) -> dict[str, Any]:
    """How fast the benchmark's TensorBoard reader parses this run's event file from the start (the most it
    can follow), next to TensorBoard's raw record loader (no Event parsing, no accumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    [run_dir] = [d for d in tb_dir.iterdir() if d.is_dir()]
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    t0 = time.perf_counter()
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 1000})
    acc.Reload()
    acc_s = time.perf_counter() - t0
    n = sum(1 for _ in acc.Scalars("loss")) if "loss" in acc.Tags()["scalars"] else 0
    t0 = time.perf_counter()
    records = sum(1 for f in files for _ in RawEventFileLoader(str(f)).Load())
    raw_s = time.perf_counter() - t0
    return {"records": records, "event_accumulator_events_per_s": round(records / max(acc_s, 1e-9)),
            "raw_loader_records_per_s": round(records / max(raw_s, 1e-9)), "scalars_kept": n}


def freshness(work: Path, rate: float, seconds: float, mlflow_workers: int = 2) -> dict[str, Any]:
    import signal

    sys.path.insert(0, str(HERE.parent))
    from bench_agent_cpu import Service  # the same agent process the CPU benchmark measures

    (work / "mlflow").mkdir()
    server, uri = _mlflow_server(work / "mlflow", mlflow_workers)
    settled_s = _settle(_Cpu({"mlflow_server": server.pid}), "mlflow_server")  # before anyone asks it anything
    svc = Service("agent", work / "agent")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fresh = work / "fresh"
        fresh.mkdir()
        cfg = {"tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(work / "tb"), "use_mlflow": True,
                            "mlflow_tracking_uri": uri, "mlflow_experiment_name": "fresh"},
               "agent": {"autostart": False}}
        targets = {"store": str(svc.store()), "tensorboard": str(work / "tb"), "mlflow": uri}
        procs = [subprocess.Popen([sys.executable, str(HERE), "--poll", kind, target, str(fresh)], env=svc.env)
                 for kind, target in targets.items()]
        trainer = subprocess.Popen([sys.executable, str(HERE), "--fresh-trainer", str(rate), str(seconds),
                                    str(fresh), json.dumps(cfg)], env=svc.env)
        deadline = time.monotonic() + 120
        while not (fresh / "run_id").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The clock runs once the run exists in every backend: the agent's first delivery to a sink imports its
        # library (mlflow: seconds of CPU, holding the import locks the other sinks' threads wait on) and
        # creates the backend's run; that happens once per agent, not per point, and is not the figure.
        while not all((fresh / f"ready-{k}").exists() for k in targets) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)
        cpu = _Cpu({"agent": svc.proc.pid, "mlflow_server": server.pid, "trainer": trainer.pid,
                    **{f"reader_{k}": p.pid for k, p in zip(targets, procs)}})
        (fresh / "go").touch()
        t_go = time.monotonic()
        while not (fresh / "returned.json").exists() and trainer.poll() is None:
            time.sleep(0.05)
        window_cpu = cpu.since_start()  # while the trainer logs: who had the two cores
        window_s = time.monotonic() - t_go
        trainer.wait(seconds + 300)
        returned = json.loads((fresh / "returned.json").read_text())
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # every backend shows the last step, or three minutes passed
            time.sleep(0.5)
            if all((fresh / f"seen-{k}.json").exists() for k in targets):
                break
        total_cpu = cpu.since_start()  # until every backend showed the last step
        (fresh / "stop-polling").touch()
        for p in procs:
            p.wait(60)
        out: dict[str, Any] = {"rate": rate, "seconds": seconds, "events": len(returned),
                               "achieved_rate": round(len(returned) / seconds, 1), "mlflow_workers": mlflow_workers,
                               "mlflow_server_settle_s": settled_s,
                               "cores_while_logging": {k: round(v / window_s, 3) for k, v in window_cpu.items()},
                               "cpu_s_until_all_seen": total_cpu}
        trainer_cpu = json.loads((fresh / "trainer.json").read_text())["cpu_s"]
        out["trainer_us_per_log_call"] = round(1e6 * trainer_cpu / max(1, len(returned)), 1)
        for kind in targets:
            seen = json.loads((fresh / f"seen-{kind}.json").read_text())
            out[kind] = _latencies(returned, seen)
            out[kind]["goal_p99_s"] = GOALS["freshness_p99_s"][kind]
            out[kind]["reader"] = json.loads((fresh / f"reader-{kind}.json").read_text())
        out["tensorboard"]["reader_ceiling"] = _tb_reader_ceiling(work / "tb")
        # The server's CPU per point over the whole run: its ceiling is (cores it can use) / that.
        out["mlflow"]["server_cpu_us_per_point"] = round(1e6 * total_cpu["mlflow_server"] / max(1, len(returned)), 1)
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        svc.stop()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def _latencies(returned: list[float], seen: list[list[float]]) -> dict[str, Any]:
    lat: list[float] = []
    j = 0
    for step, t_ret in enumerate(returned):
        while j < len(seen) and seen[j][1] < step:
            j += 1
        if j == len(seen):
            break
        lat.append(max(0.0, seen[j][0] - t_ret))
    unseen = len(returned) - len(lat)
    # steps a backend never showed count as infinitely late: they are in the percentiles, not left out
    lat += [float("inf")] * unseen
    return {"p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99), "max_s": round(max(lat), 4) if lat else None,
            "steps_unseen": unseen, "polls_with_news": len(seen)}


# --- main -----------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute or two)")
    ap.add_argument("--events", type=int, default=None, help="events in the WAL for sink_cpu (default 1,000,000)")
    ap.add_argument("--keys", default="1,4", help="values per event, one sink_cpu row each")
    ap.add_argument("--only", default="sink_cpu,read,freshness")
    ap.add_argument("--fresh-rate", type=float, default=10_000)
    ap.add_argument("--fresh-seconds", type=float, default=None)
    ap.add_argument("--mlflow-workers", type=int, default=2, help="the freshness run's `mlflow server --workers`")
    ap.add_argument("--old-commit", default="5af902f", help="the commit whose agent/store.py is the row store")
    ap.add_argument("--base-commit", default=None, help="sink_cpu: also this commit's chunk store, side by side")
    ap.add_argument("--repeats", type=int, default=2, help="sink_cpu: runs of each peer (the least CPU counts)")
    args = ap.parse_args()
    n = args.events or (100_000 if args.quick else 1_000_000)
    only = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="fl-bstore-"))
    result: dict[str, Any] = {"cpus": os.cpu_count(), "goals": GOALS, "old_commit": args.old_commit}
    try:
        old = old_store_module(args.old_commit)
        if "sink_cpu" in only or "read" in only:
            base_sink = chunk_store_sink(args.base_commit) if args.base_commit else None
            rows = [sink_cpu(work, n, int(k), old, 1 if args.quick else args.repeats, base_sink) for k in args.keys.split(",")]
            result["sink_cpu"] = rows
            print(json.dumps(rows), file=sys.stderr, flush=True)
            if "read" in only:
                result["read"] = read_bench(rows[0], old)
        if "freshness" in only:
            result["freshness"] = freshness(work, args.fresh_rate, args.fresh_seconds or (3.0 if args.quick else 10.0),
                                            args.mlflow_workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in result.get("sink_cpu", []):
        for peer in ("null", "row_store", "chunk_store", "base_chunk_store"):
            row.get(peer, {}).pop("db", None)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fresh-trainer":
        sys.exit(fresh_trainer(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--poll":
        sys.exit(poller(sys.argv[2:]))
    main()
