"""Helpers and fixtures for the backend sink tests: a real MLflow server, WAL writing, in-process sink
runners, and readers of what the backends wrote (TensorBoard's EventAccumulator, W&B's .wandb log)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from flightlog.agent.retry import CircuitBreaker, RetryPolicy
from flightlog.agent.runner import CursorStore, SinkRunner
from flightlog.agent.wal import WAL, WALReader
from flightlog.proto.codec import encode_event
from flightlog.proto.events import Event, HyperParams, Metrics, RunEnd, RunStart, Tags, Text
from flightlog.proto.frames import append_frame

# MLflow's client retries a refused connection for minutes by default; the sinks leave retries to the
# runner (MLflowTracker.open sets the same), and so do the tests' own read-back clients.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

# --- events and the WAL ------------------------------------------------------------------------


def run_events(run_id: str, name: str, tracking: dict[str, Any], *, steps: int, keys: list[str],
               sinks: list[str], params: dict[str, Any] | None = None, status: str = "completed",
               description: str = "a test run", tags: list[str] | None = None, t0: float = 1.7e9,
               end: bool = True) -> list[Event]:
    """A whole run as the SDK would log it; metric value = step * 10 + key index (easy to check)."""
    evs: list[Event] = [RunStart(run_id=run_id, name=name, timestamp=t0, description=description,
                                 tags=tags or ["t1", "t2"], config={"tracking": tracking}, sinks=sinks)]
    evs.append(HyperParams(run_id, params or {"lr": 0.001, "layers": 4, "opt": {"name": "adam"}}, t0))
    evs.append(Tags(run_id, {"team": "x"}, t0))
    evs.append(Text(run_id, "notes", "hello **world**", 0, t0))
    for s in range(steps):
        evs.append(Metrics(run_id, s, t0 + s * 0.01, {k: float(s * 10 + i) for i, k in enumerate(keys)}))
    if end:
        evs.append(RunEnd(run_id, status, t0 + steps * 0.01 + 1))
    return evs


def write_wal(wal_dir: Path, events: Iterable[Event], per_record: int = 500) -> int:
    """Append events to a WAL directory (records of ``per_record`` frames); returns how many."""
    n = total = 0
    buf = bytearray()
    with WAL(wal_dir, fsync="never") as wal:
        for ev in events:
            append_frame(buf, encode_event(ev))
            n += 1
            if n == per_record:
                wal.append(buf, n, "test")
                total += n
                buf, n = bytearray(), 0
        if n:
            wal.append(buf, n, "test")
            total += n
    return total


def drive(sinks: list[Any], wal_dir: Path, store_path: Path, timeout: float = 120.0) -> list[SinkRunner]:
    """Run a SinkRunner per sink over the WAL until each is caught up (in this process)."""
    runners: list[SinkRunner] = []

    async def main() -> None:
        cursors = CursorStore(store_path)
        for s in sinks:
            runners.append(SinkRunner(s, WALReader(wal_dir), cursors, policy=RetryPolicy(initial=0.05, maximum=0.5),
                                      breaker=CircuitBreaker(threshold=5, reset_after=0.5), idle_sleep=0.02))
        with anyio.fail_after(timeout):
            async with anyio.create_task_group() as tg:
                for r in runners:
                    tg.start_soon(r.run)
                await anyio.sleep(0.05)
                while not all(r.caught_up for r in runners):
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()

    anyio.run(main)
    return runners


# --- MLflow server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and a temp artifact dir; kill/restart keep both."""

    def __init__(self, root: Path, backend_uri: str | None = None) -> None:
        self.root = root
        self.backend_uri = backend_uri or f"sqlite:///{root}/mlflow.db"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0, *, app: list[str] | None = None,
              env: dict[str, str] | None = None) -> MlflowServer:
        """Start it (``app``: e.g. ``["--app-name", "basic-auth"]``; ``env``: the server's environment)."""
        import urllib.request

        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *(app or []), "--backend-store-uri", self.backend_uri,
             "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.kill()  # a server still starting must not outlive the fixture that gave up on it
        raise RuntimeError(f"mlflow server did not come up in {timeout:.0f} s: "
                           f"{(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the whole server (uvicorn and its worker)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow server; given minutes to come up (a loaded CI machine), and stopped if it never does."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server.start(timeout=300)
    finally:
        server.stop()


# --- readers -----------------------------------------------------------------------------------


def approx_points(points: Iterable[tuple[int, float]]) -> list[tuple[int, Any]]:
    """(step, value) points to compare with ``==``: steps exact, values ``pytest.approx`` (which takes no
    nested data itself since pytest 9.2)."""
    return [(step, pytest.approx(value)) for step, value in points]


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run directory's event files, read by TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_accumulator(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


_BLOCK = 32768
_WB_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_REC_HEADER = struct.Struct("<IHB")  # crc32 (of type byte + data), length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_log(path: Path) -> list[Any]:
    """Records of a ``.wandb`` transaction log: LevelDB-log-style 32 KiB blocks of 7-byte-header chunks
    (CRC-32 of type byte + data), after a 7-byte file header; each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = _WB_HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    pos = _WB_HEADER.size
    records: list[Any] = []
    pending = bytearray()
    while pos + _REC_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER.size:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = _REC_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left  # zero-filled rest of a block
            continue
        chunk = data[pos + _REC_HEADER.size: pos + _REC_HEADER.size + length]
        assert len(chunk) == length, f"{path}: torn chunk at {pos}"
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: CRC mismatch at {pos}"
        pos += _REC_HEADER.size + length
        if kind == _FULL:
            pending = bytearray(chunk)
        elif kind == _FIRST:
            pending = bytearray(chunk)
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            pending += chunk
        else:
            raise AssertionError(f"{path}: unknown chunk type {kind} at {pos}")
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(bytes(pending))
        records.append(rec)
    return records


def wandb_logs(root: Path, wandb_id: str) -> list[Path]:
    return sorted(root.rglob(f"run-{wandb_id}.wandb"))


def ended_mlflow_runs(client: Any, experiment: str, run_id: str, timeout: float = 120.0) -> list[Any]:
    """The MLflow runs tagged with flightlog's ``run_id`` in ``experiment``, once the first has ended."""
    deadline = time.monotonic() + timeout
    while True:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`flightlog.run_id` = '{run_id}'") if exp else []
        if runs and runs[0].info.status != "RUNNING":
            return list(runs)
        assert time.monotonic() < deadline, "MLflow run never ended"
        time.sleep(0.3)


def wandb_exit_codes(root: Path, wandb_id: str, timeout: float = 120.0) -> list[int]:
    """The exit codes in the run's .wandb files under ``root``, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        exits = [r.exit.exit_code for p in wandb_logs(root, wandb_id) for r in read_wandb_log(p)
                 if r.WhichOneof("record_type") == "exit"]
        if exits:
            return exits
        assert time.monotonic() < deadline, "W&B run never finished"
        time.sleep(0.3)


def wandb_history(root: Path, wandb_id: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(history rows, config, summary) across every .wandb file of the run (a resume writes a new one)."""
    import json

    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for p in wandb_logs(root, wandb_id):
        for rec in read_wandb_log(p):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
            elif kind == "config":
                for item in rec.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "run":
                for item in rec.run.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "summary":
                for item in rec.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows, config, summary


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
