"""A trainer that dies without finish() (SIGKILL, SIGTERM, os._exit) ends its run as ``crashed`` once the agent
has drained its ring: in the local store (`runs ls`), MLflow, W&B and TensorBoard; unless another live
producer still holds the run (issue 10, item 4). Also: the agent removes its empty ring directory on exit
(item 18). Every trainer here is a real process, killed for real."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, new_id
from conftest_backends import (  # noqa: F401
    MlflowServer,
    ended_mlflow_runs,
    mlflow_server,
    read_wandb_log,
    tb_accumulator,
    wandb_exit_codes,
    wandb_logs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.agent.ingest import Ingestor
from flightlog.agent.ring import RingView
from flightlog.agent.sinks.wandb_sink import wandb_run_id
from flightlog.agent.store import Store
from flightlog.agent.wal import WAL, WalCursor, WALReader
from flightlog.proto.codec import decode_event
from flightlog.proto.events import RunEnd
from flightlog.proto.osutil import process_alive, process_start_ticks
from flightlog.proto.paths import AgentPaths
from flightlog.proto.ring import OFF_PID

pytestmark = [pytest.mark.timeout(240),
              # mlflow's sqlalchemy store (sqlite:/// URIs) uses an option sqlalchemy 2.1 deprecates
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]

# argv: run id, config (JSON), number of steps, then how to end: "kill" (SIGKILL itself), "exit" (os._exit),
# "wait" (print "ready", then finish() on a line from stdin; the parent may kill it before).
TRAINER = """
    import json, os, signal, sys, flightlog
    run_id, config, n, how = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    t = flightlog.ExperimentTracker("crashy", config, run_id=run_id)
    t.log_hyperparameters({"lr": 0.5})
    for i in range(n):
        t.log_metrics({"loss": float(i)}, step=i)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "exit":
        os._exit(3)
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()
    t.finish()
    print("finished", flush=True)
"""


def trainer(run_id: str, config: dict[str, Any], n: int, how: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINER), run_id, json.dumps(config), str(n), how],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), f"trainer did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
    return int(line.split()[1])


def run_row(paths: AgentPaths, run_id: str) -> dict[str, Any]:
    if not paths.store.exists():
        return {}
    store = Store(paths.store, readonly=True)
    try:
        return store.run(run_id)
    except Exception:
        return {}
    finally:
        store.close()


def wait_status(paths: AgentPaths, run_id: str, status: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = run_row(paths, run_id)
        if row.get("status") == status:
            return row
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} is {row.get('status')!r}, not {status!r}, after {timeout} s")


def points(paths: AgentPaths, run_id: str) -> int:
    store = Store(paths.store, readonly=True)
    try:
        return len(store.metric_series(run_id, "loss"))
    finally:
        store.close()


def runs_ls(paths: AgentPaths) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "runs", "ls", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {r["run_id"]: r["status"] for r in json.loads(out.stdout)}


# --- the local store, with real processes ----------------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "sigterm", "exit"])
def test_dead_trainer_ends_crashed_with_every_event(agent: AgentProcess, base_config: dict, how: str) -> None:
    """SIGKILL (the OOM killer's signal), SIGTERM (a scheduler's; the SDK installs no handler) and os._exit:
    the run ends crashed after all its points, with the reason; `runs ls` says so."""
    run_id = "dead" + how + new_id()
    proc = trainer(run_id, base_config, 3000, "wait" if how == "sigterm" else how)
    if how == "sigterm":
        wait_ready(proc)
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == {"kill": -signal.SIGKILL, "sigterm": -signal.SIGTERM, "exit": 3}[how]
    row = wait_status(agent.paths, run_id, "crashed")
    assert points(agent.paths, run_id) == 3000  # ended after its data, not before
    assert row["ended_at"] and f"pid {proc.pid}" in row["error"] and "without finish()" in row["error"]
    assert row["params"] == {"lr": 0.5}
    assert runs_ls(agent.paths)[run_id] == "crashed"
    assert not list(agent.paths.ring_dir.glob(f"{run_id}-*.ring"))  # retired


def test_trainer_that_finished_is_not_crashed(agent: AgentProcess, base_config: dict) -> None:
    run_id = "fine" + new_id()
    proc = trainer(run_id, base_config, 100, "wait")
    wait_ready(proc)
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and "finished" in out, err
    wait_status(agent.paths, run_id, "completed")
    deadline = time.monotonic() + 30
    while list(agent.paths.ring_dir.glob(f"{run_id}-*.ring")):
        assert time.monotonic() < deadline, "ring never retired"
        time.sleep(0.1)
    time.sleep(1.5)  # a liveness pass or two
    assert run_row(agent.paths, run_id)["status"] == "completed"


def test_trainer_killed_while_no_agent_runs_ends_crashed_once_one_starts(agent_paths: AgentPaths,
                                                                         base_config: dict) -> None:
    """The agent is down when the trainer dies: the next agent drains the ring it finds and ends the run."""
    run_id = "orphan" + new_id()
    proc = trainer(run_id, base_config, 2000, "kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(agent_paths.ring_dir.glob(f"{run_id}-*.ring"))
    agent = AgentProcess(agent_paths).start()
    try:
        wait_status(agent_paths, run_id, "crashed")
        assert points(agent_paths, run_id) == 2000
    finally:
        agent.stop()


def test_run_held_by_two_producers_stays_running_until_the_survivor_finishes(agent: AgentProcess,
                                                                             base_config: dict) -> None:
    run_id = "shared" + new_id()
    a = trainer(run_id, base_config, 500, "wait")
    b = trainer(run_id, base_config, 500, "wait")
    pid_a, pid_b = wait_ready(a), wait_ready(b)
    wait_status(agent.paths, run_id, "running")
    a.kill()
    a.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while list(agent.paths.ring_dir.glob(f"{run_id}-{pid_a}-*.ring")):  # drained and retired
        assert time.monotonic() < deadline, "the dead producer's ring was never retired"
        time.sleep(0.1)
    assert list(agent.paths.ring_dir.glob(f"{run_id}-{pid_b}-*.ring"))
    time.sleep(1.5)
    assert run_row(agent.paths, run_id)["status"] == "running"
    assert f"run {run_id} stays running" in agent.read_log()
    out, err = b.communicate("go\n", timeout=60)
    assert b.returncode == 0, err
    wait_status(agent.paths, run_id, "completed")


def test_survivor_dying_too_ends_the_run_crashed(agent: AgentProcess, base_config: dict) -> None:
    run_id = "bothdie" + new_id()
    a = trainer(run_id, base_config, 300, "wait")
    b = trainer(run_id, base_config, 300, "wait")
    wait_ready(a), wait_ready(b)
    wait_status(agent.paths, run_id, "running")
    a.kill()
    a.communicate(timeout=30)
    time.sleep(2.0)
    assert run_row(agent.paths, run_id)["status"] == "running"
    b.kill()
    b.communicate(timeout=30)
    wait_status(agent.paths, run_id, "crashed")


# --- the ingestor, in this process: what decides "dead" ---------------------------------------------

PRODUCER = """
    import os, sys
    from flightlog.ring import RingProducer
    ring = RingProducer(sys.argv[1], 1 << 16, sys.argv[2], sys.argv[3], run_id=sys.argv[4])
    for i in range(int(sys.argv[5])):
        ring.write_frame(b"x" * 40)
    if sys.argv[6] == "ended":
        ring.mark_ended()
    os._exit(0)
"""


def _dead_ring(tmp_path: Path, run_id: str, n: int, ended: bool = False) -> tuple[Path, str]:
    producer_id = f"{run_id}-{os.getpid()}-abcdef"
    path = tmp_path / "rings" / f"{producer_id}.ring"
    subprocess.run([sys.executable, "-c", textwrap.dedent(PRODUCER), str(path), producer_id, str(tmp_path / "spill"),
                    run_id, str(n), "ended" if ended else "no"], check=True, timeout=60)
    return path, producer_id


def _wal_run_ends(wal_dir: Path) -> list[RunEnd]:
    ends = []
    with WALReader(wal_dir) as reader:
        batch, _ = reader.read(WalCursor.start(), max_events=100_000, max_bytes=1 << 30)
    for _, payload in batch:
        if bytes(payload) == b"x" * 40:
            continue  # the test's own frames
        ev = decode_event(payload)
        if isinstance(ev, RunEnd):
            ends.append(ev)
    return ends


def _ingest_until_retired(tmp_path: Path) -> Ingestor:
    wal = WAL(tmp_path / "wal", fsync="never")
    ing = Ingestor(wal, tmp_path / "rings")
    deadline = time.monotonic() + 30
    ing.scan()
    while True:
        ing.drain()
        if not ing.rings:
            break
        assert time.monotonic() < deadline, "ring never retired"
        time.sleep(0.05)
    ing.close()
    wal.close()
    return ing


def test_ingestor_ends_a_dead_producers_run_after_its_frames(tmp_path: Path) -> None:
    path, _ = _dead_ring(tmp_path, "unit-run", 50)
    view = RingView(path)
    assert view.run_id == "unit-run" and view.pid != os.getpid() and view.pid_start
    assert not view.producer_alive()
    view.close()
    ing = _ingest_until_retired(tmp_path)
    assert ing.events_total == 51  # 50 frames + the RunEnd
    [end] = _wal_run_ends(tmp_path / "wal")
    assert end.run_id == "unit-run" and end.status == "crashed"
    assert not path.exists()
    assert not (tmp_path / "rings").exists()  # item 18: the empty ring directory goes on close


def test_producer_that_wrote_its_run_end_is_not_crashed(tmp_path: Path) -> None:
    """Killed after finish() wrote the RunEnd (while it flushed or waited for checkpoints): not a crash."""
    _dead_ring(tmp_path, "ended-run", 10, ended=True)
    ing = _ingest_until_retired(tmp_path)
    assert ing.events_total == 10
    assert _wal_run_ends(tmp_path / "wal") == []


def test_reused_pid_counts_as_dead(tmp_path: Path) -> None:
    """The ring names a pid that a live process has now (ours), but that process started at another time."""
    import mmap
    import struct

    path, _ = _dead_ring(tmp_path, "reused", 5)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        struct.pack_into("<I", mm, OFF_PID, os.getpid())
    view = RingView(path)
    assert view.pid == os.getpid() and view.pid_start != process_start_ticks(os.getpid())
    assert not view.producer_alive()
    view.close()
    assert process_alive(os.getpid(), process_start_ticks(os.getpid()))
    assert process_alive(os.getpid(), 0)  # unknown start time (an older SDK): the pid alone decides
    [end] = _wal_run_ends_after(tmp_path)
    assert end.run_id == "reused" and end.status == "crashed"


def _wal_run_ends_after(tmp_path: Path) -> list[RunEnd]:
    _ingest_until_retired(tmp_path)
    return _wal_run_ends(tmp_path / "wal")


def test_older_sdk_ring_without_run_id_uses_the_producer_id(tmp_path: Path) -> None:
    for producer_id, run_id in [("my-run.1-1234-abcdef", "my-run.1"), ("my-run.1-1234-abcdef-side", "my-run.1"),
                                ("odd", "odd")]:
        path = tmp_path / "rings" / f"{producer_id}.ring"
        subprocess.run([sys.executable, "-c", textwrap.dedent(PRODUCER), str(path), producer_id,
                        str(tmp_path / "spill"), "", "1", "no"], check=True, timeout=60)
        view = RingView(path)
        assert view.run_id == run_id
        view.close()
        path.unlink()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.text(alphabet="ab-1side", max_size=40))
def test_run_id_from_any_header_bytes_is_a_string(tmp_path: Path, field: bytes, producer_id: str) -> None:
    """The run id field is outside bytes (another process wrote them): any content gives a str, no error."""
    import mmap
    import struct

    from flightlog.proto.ring import OFF_RUN_ID
    from flightlog.ring import RingProducer

    path = tmp_path / f"fuzz-{new_id()}.ring"
    RingProducer(path, 1 << 16, producer_id or "p", tmp_path / "spill").close()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[OFF_RUN_ID : OFF_RUN_ID + len(field)] = field
        if len(field) >= 2:
            struct.pack_into("<H", mm, OFF_RUN_ID, len(field))
    view = RingView(path)
    try:
        assert isinstance(view.run_id, str) and view.run_id
        assert (producer_id or "p").startswith(view.run_id)
    finally:
        view.close()
        path.unlink()


# --- every backend -------------------------------------------------------------------------------


def test_crashed_run_in_mlflow_wandb_and_tensorboard(agent: AgentProcess, mlflow_server: MlflowServer,  # noqa: F811
                                                     tmp_path: Path) -> None:
    from mlflow import MlflowClient

    wb, tb = tmp_path / "wandb", tmp_path / "tb"
    config = {
        "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(tb),
                     "use_mlflow": True, "mlflow_tracking_uri": mlflow_server.uri, "mlflow_experiment_name": "crashes",
                     "use_wandb": True, "wandb_mode": "offline", "wandb_dir": str(wb), "wandb_project": "crashes"},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "agent": {"autostart": False},
    }
    run_id = "backends" + new_id()
    proc = trainer(run_id, config, 200, "kill")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    wait_status(agent.paths, run_id, "crashed")

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = ended_mlflow_runs(client, "crashes", run_id)
    ml = runs[0]
    assert ml.info.status == "FAILED"
    assert ml.data.tags["flightlog.status"] == "crashed" and "without finish()" in ml.data.tags["flightlog.error"]
    assert len(client.get_metric_history(ml.info.run_id, "loss")) == 200

    assert wandb_exit_codes(wb, wandb_run_id(run_id)) == [1]
    summary = {item.key: json.loads(item.value_json) for p in wandb_logs(wb, wandb_run_id(run_id))
               for r in read_wandb_log(p) if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert summary["flightlog/status"] == "crashed"

    deadline = time.monotonic() + 60
    while not any(json.loads(p.read_text()).get("ended") for p in tb.glob("*/.flightlog-tb.json")):
        assert time.monotonic() < deadline, "TensorBoard never ended the run"
        time.sleep(0.2)
    acc = tb_accumulator(next(tb.iterdir()))
    [status_tag] = [t for t in acc.Tags()["tensors"] if t.startswith("flightlog/status")]
    text = acc.Tensors(status_tag)[-1].tensor_proto.string_val[0].decode()
    assert "crashed" in text and "without finish()" in text
    assert len(acc.Scalars("loss")) == 200


# --- item 18 -------------------------------------------------------------------------------------


def test_agent_removes_its_empty_ring_directory_on_exit(agent_paths: AgentPaths, base_config: dict) -> None:
    agent = AgentProcess(agent_paths).start()
    assert agent_paths.ring_dir.is_dir()  # the doorbell lives there
    run_id = "tidy" + new_id()
    proc = trainer(run_id, base_config, 10, "wait")
    wait_ready(proc)
    proc.communicate("go\n", timeout=60)
    wait_status(agent_paths, run_id, "completed")
    deadline = time.monotonic() + 30
    while list(agent_paths.ring_dir.glob("*.ring")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert agent.stop() == 0
    assert not agent_paths.ring_dir.exists()
    assert agent_paths.ring_dir.parent.is_dir()  # shared by every agent of this user: left alone
