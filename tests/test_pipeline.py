"""The event pipeline end to end, with real processes: SDK -> ring -> agent -> WAL -> local store."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import AgentProcess, new_id

import flightlog
from flightlog.agent.store import Store
from flightlog.proto.paths import AgentPaths, resolve_paths


def _training_points(store: Store, run_id: str) -> list[dict]:
    # The agent's system monitor adds system/* points to long runs; these tests count what they logged.
    return [p for p in store.metric_points(run_id) if not p["key"].startswith("system/")]


def wait_points(paths: AgentPaths, run_id: str, n: int, timeout: float = 60.0) -> list[dict]:
    """Poll the local store until the run has n logged metric points (or time out); return them."""
    deadline = time.monotonic() + timeout
    points: list[dict] = []
    while time.monotonic() < deadline:
        if paths.store.exists():
            store = Store(paths.store, readonly=True)
            try:
                points = _training_points(store, run_id)
            except Exception:
                points = []
            finally:
                store.close()
            if len(points) >= n:
                time.sleep(0.3)  # would more (duplicates) arrive?
                store = Store(paths.store, readonly=True)
                points = _training_points(store, run_id)
                store.close()
                return points
        time.sleep(0.1)
    return points


def run_child(code: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout
    )


def assert_exactly_once(points: list[dict], keys: list[str], n: int) -> None:
    counts = Counter((p["key"], p["step"]) for p in points)
    missing = [(k, s) for k in keys for s in range(n) if counts[(k, s)] == 0]
    dupes = [ks for ks, c in counts.items() if c > 1]
    assert not missing, f"{len(missing)} points missing, e.g. {missing[:5]}"
    assert not dupes, f"{len(dupes)} points duplicated, e.g. {dupes[:5]}"
    assert len(points) == len(keys) * n


def test_log_flush_and_export(agent: AgentProcess, base_config: dict) -> None:
    with flightlog.experiment_tracking("export-me", base_config, description="d", tags=["a", "b"]) as t:
        t.log_hyperparameters({"lr": 1e-4, "batch_size": 32, "layers": [1, 2]})
        for i in range(1000):
            t.log_metrics({"loss": 1.0 / (i + 1), "acc": i / 1000, "nan": float("nan"), "inf": float("inf")}, step=i)
        t.flush()
        run_id = t.run_id
        assert t.metadata.status == "running"
    assert t.metadata.status == "completed" and t.metadata.ended_at is not None
    points = wait_points(agent.paths, run_id, 4000)
    assert_exactly_once(points, ["loss", "acc", "nan", "inf"], 1000)
    out = subprocess.run(
        [sys.executable, "-m", "flightlog.agent.cli", "runs", "export", run_id, "--format", "jsonl"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    rows = [r for r in map(json.loads, out) if not r["key"].startswith("system/")]
    assert len(rows) == 4000
    assert set(rows[0]) == {"run", "key", "step", "timestamp", "value", "rank"} and rows[0]["rank"] == 0
    by_key = {(r["key"], r["step"]): r["value"] for r in rows}
    assert by_key[("loss", 9)] == pytest.approx(0.1)
    assert by_key[("nan", 3)] == "NaN" and by_key[("inf", 3)] == "Infinity"
    store = Store(agent.paths.store, readonly=True)
    run = store.run(run_id)
    store.close()
    assert run["status"] == "completed" and run["description"] == "d"
    assert json.loads(run["tags"]) == ["a", "b"]
    assert run["params"] == {"lr": 1e-4, "batch_size": 32, "layers": [1, 2]}
    # the run's hash covers its config and the hyper-parameters it logged (issue "Where users already train")
    assert run["config_hash"] == flightlog.config_hash(base_config, {"lr": 1e-4, "batch_size": 32, "layers": [1, 2]})
    assert run["config_hash"] != flightlog.config_hash(base_config)


def test_failed_run_records_traceback(agent: AgentProcess, base_config: dict) -> None:
    with pytest.raises(ZeroDivisionError):
        with flightlog.experiment_tracking("boom", base_config) as t:
            t.log_metrics({"x": 1.0})
            raise ZeroDivisionError("division by zero")
    assert t.metadata.status == "failed" and "ZeroDivisionError" in t.metadata.error
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        store = Store(agent.paths.store, readonly=True)
        run = store.run(t.run_id) if store.runs() else {}
        store.close()
        if run.get("status") == "failed":
            break
        time.sleep(0.1)
    assert run["status"] == "failed" and "ZeroDivisionError" in run["error"]


def test_bad_values_are_type_errors_and_numbers_are_coerced(agent: AgentProcess, base_config: dict) -> None:
    import numpy as np

    t = flightlog.ExperimentTracker("types", base_config)
    with pytest.raises(TypeError, match="'loss' must be a number"):
        t.log_metrics({"loss": "high"}, step=0)
    with pytest.raises(TypeError, match="must be str"):
        t.log_metrics({1: 0.5}, step=0)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="dict"):
        t.log_metrics([("a", 1.0)], step=0)  # type: ignore[arg-type]
    t.log_metrics({"np32": np.float32(0.5), "np64": np.float64(0.25), "flag": True, "i": 3}, step=5)
    with pytest.raises(TypeError, match="step must be an int"):
        t.log_metrics({"x": 1.0}, step=1.5)  # type: ignore[arg-type]
    t.log_metrics({"back": 1.0}, step=np.int64(2))  # steps going backwards: recorded as given
    t.log_metrics({"auto": 1.0})  # no step: previous + 1
    t.finish()
    points = {(p["key"], p["step"]): p["value"] for p in wait_points(agent.paths, t.run_id, 6)}
    assert points == {("np32", 5): 0.5, ("np64", 5): 0.25, ("flag", 5): 1.0, ("i", 5): 3,
                      ("back", 2): 1.0, ("auto", 3): 1.0}


def test_sidecar_starts_by_itself_and_exits_after_draining(agent_paths: AgentPaths, base_config: dict) -> None:
    cfg = {**base_config, "agent": {"autostart": True, "idle_exit_seconds": 0.5}}
    with flightlog.experiment_tracking("sidecar", cfg) as t:
        for i in range(5000):
            t.log_metrics({"loss": float(i)}, step=i)
    assert_exactly_once(wait_points(agent_paths, t.run_id, 5000), ["loss"], 5000)
    from flightlog.client import _sidecars

    sidecar = _sidecars[-1]
    assert sidecar.wait(30) == 0, "the sidecar should exit once drained"
    assert not agent_paths.socket.exists()
    # It waited for the run's final plots (rendered every 2 s at most), though its idle grace is 0.5 s.
    plots = agent_paths.data_dir / "runs" / t.run_id / "plots"
    assert sorted(plots.glob("*.png")), list(plots.parent.rglob("*"))


TRAINER = """
    import os, signal, sys, flightlog
    n = int(sys.argv[2])
    t = flightlog.ExperimentTracker("crash", {"agent": {"autostart": False},
                                     "tracking": {"use_tensorboard": False}}, run_id=sys.argv[1])
    for i in range(n):
        t.log_metrics({"x": float(i), "y": -float(i)}, step=i)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_trainer_sigkill_right_after_last_log_loses_nothing(agent: AgentProcess) -> None:
    run_id = "crash" + new_id()
    proc = run_child(TRAINER, run_id, "20000")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_exactly_once(wait_points(agent.paths, run_id, 40000), ["x", "y"], 20000)


PRODUCER = """
    import sys, time, flightlog
    n = int(sys.argv[2])
    t = flightlog.ExperimentTracker("steady", {"agent": {"autostart": False, "ring_bytes": 65536},
                                     "tracking": {"use_tensorboard": False}}, run_id=sys.argv[1])
    for i in range(n):
        t.log_metrics({"x": float(i)}, step=i)
        if i % 500 == 0:
            time.sleep(0.002)
    t.finish()
    print("done", t._producer.spilled)
"""


def test_agent_sigkill_while_producer_logs_exactly_once(agent: AgentProcess) -> None:
    run_id = "agentkill" + new_id()
    n = 200_000
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PRODUCER), run_id, str(n)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    agent.kill()
    time.sleep(0.5)
    agent.start()
    time.sleep(0.5)
    agent.kill()  # twice, for good measure
    agent.start()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert_exactly_once(wait_points(agent.paths, run_id, n, timeout=90), ["x"], n)


def test_agent_down_at_start_spills_then_drains(agent_paths: AgentPaths) -> None:
    run_id = "down" + new_id()
    n = 50_000  # ~2.5 MB of frames through a 64 KiB ring
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PRODUCER), run_id, str(n)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)  # the producer runs with no agent at all for a while
    spill_files = list(agent_paths.spill_dir.glob("*.spill"))
    assert spill_files, "the ring should have overflowed into a spill file"
    agent = AgentProcess(agent_paths).start()
    try:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert int(out.split()[1]) > 0  # events went through the spill file
        assert_exactly_once(wait_points(agent_paths, run_id, n, timeout=90), ["x"], n)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list(agent_paths.spill_dir.glob("*.spill")):
            time.sleep(0.1)
        assert not list(agent_paths.spill_dir.glob("*.spill")), "drained spill files are deleted"
    finally:
        agent.stop()


RANK = """
    import os, sys, flightlog
    rank = int(os.environ["RANK"])
    t = flightlog.ExperimentTracker("ddp", {"agent": {"autostart": False},
                                     "tracking": {"use_tensorboard": False}}, run_id=sys.argv[1])
    assert t.rank == rank
    for i in range(int(sys.argv[2])):
        t.log_metrics({f"loss/rank{rank}": float(i)}, step=i)
    t.finish()
"""


def test_four_ranks_and_a_second_job_share_one_agent(agent: AgentProcess) -> None:
    job1, job2, n = "job1" + new_id(), "job2" + new_id(), 20_000
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(RANK), job1, str(n)],
                         env={**os.environ, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in range(4)
    ]
    procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(RANK), job2, str(n)],
                                  env={**os.environ, "RANK": "0"}, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert_exactly_once(wait_points(agent.paths, job1, 4 * n), [f"loss/rank{r}" for r in range(4)], n)
    assert_exactly_once(wait_points(agent.paths, job2, n), ["loss/rank0"], n)


def test_two_agents_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent_paths: AgentPaths,
                                 base_config: dict) -> None:
    other_data = tmp_path / "other-data"
    other_sock = agent_paths.socket.parent / "b.sock"
    a = AgentProcess(agent_paths).start()
    monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(other_data))
    monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(other_sock))
    other_data.mkdir()
    b_paths = resolve_paths()
    assert b_paths.ring_dir != agent_paths.ring_dir
    b = AgentProcess(b_paths).start()
    try:
        tb = flightlog.ExperimentTracker("on-b", base_config)
        tb.log_metrics({"b": 1.0}, step=0)
        tb.finish()
        monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(agent_paths.data_dir))
        monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(agent_paths.socket))
        ta = flightlog.ExperimentTracker("on-a", base_config)
        ta.log_metrics({"a": 1.0}, step=0)
        ta.finish()
        assert len(wait_points(agent_paths, ta.run_id, 1)) == 1
        assert len(wait_points(b_paths, tb.run_id, 1)) == 1
        for paths, mine, theirs in ((agent_paths, ta.run_id, tb.run_id), (b_paths, tb.run_id, ta.run_id)):
            store = Store(paths.store, readonly=True)
            ids = {r["run_id"] for r in store.runs()}
            store.close()
            assert mine in ids and theirs not in ids
    finally:
        a.stop()
        b.stop()


def test_socket_is_private_and_other_uids_are_refused(agent: AgentProcess) -> None:
    sock = agent.paths.socket
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    if os.getuid() != 0:
        pytest.skip("needs root to connect from another uid")
    # Open the file permissions so that only the agent's SO_PEERCRED check stands in the way.
    os.chmod(sock.parent, 0o711)
    os.chmod(sock, 0o666)
    try:
        pid = os.fork()
        if pid == 0:  # child: become nobody, connect, expect a refusal
            code = 1
            try:
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(str(sock))
                from flightlog.proto.codec import decode_control

                data = b""
                while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                reply = decode_control(data[4:])
                code = 0 if (not reply.ok and "uid 65534" in reply.error) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.chmod(sock.parent, 0o700)
        os.chmod(sock, 0o600)


def test_cli_status_inspect_and_errors(agent: AgentProcess, base_config: dict) -> None:
    t = flightlog.ExperimentTracker("cli", base_config)
    t.log_metrics({"a": 1.0}, step=0)
    t.flush()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flightlog.agent.cli", *args], capture_output=True, text=True)

    st = cli("status")
    assert st.returncode == 0 and "agent: up" in st.stdout and "store:" in st.stdout
    data = json.loads(cli("status", "--json").stdout)
    assert any(p["producer"] == t.producer_id for p in data["producers"])
    assert set(data["sinks"]["store"]) >= {"state", "backlog_events", "backlog_bytes", "last_error"}
    t.finish()
    ins = cli("wal", "inspect", str(agent.paths.wal_dir))
    assert ins.returncode == 0 and "records" in ins.stdout
    ls = cli("runs", "ls")
    assert t.run_id in ls.stdout
    bad = cli("runs", "export", "no-such-run")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no run 'no-such-run'" in bad.stderr
    bad = cli("wal", "inspect", "/nonexistent/wal")
    assert bad.returncode == 1 and bad.stderr.startswith("flightlog: error:") and bad.stderr.count("\n") == 1
    agent.stop()
    down = cli("status")
    assert down.returncode == 1 and "not running" in down.stdout


def test_socket_fallback_where_rings_are_unsafe(agent: AgentProcess, base_config: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPUs other than x86-64 events travel over the control socket in batches (forced here)."""
    monkeypatch.setenv("FLIGHTLOG_TRANSPORT", "socket")
    with flightlog.experiment_tracking("no-ring", base_config) as t:
        assert t._producer is None
        t.log_hyperparameters({"lr": 0.1})
        for i in range(5000):  # several 64 KiB batches, then the rest at finish
            t.log_metrics({"x": float(i)}, step=i)
    assert_exactly_once(wait_points(agent.paths, t.run_id, 5000), ["x"], 5000)
    store = Store(agent.paths.store, readonly=True)
    run = store.run(t.run_id)
    store.close()
    assert run["status"] == "completed" and run["params"] == {"lr": 0.1}


def test_segments_are_deleted_once_every_sink_passed_them(agent_paths: AgentPaths, base_config: dict,
                                                          tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("wal:\n  segment_bytes: 65536\n")
    agent = AgentProcess(agent_paths, ["--config", str(cfg)]).start()
    try:
        t = flightlog.ExperimentTracker("rotate", base_config)
        for i in range(30_000):  # ~2 MB of frames: dozens of 64 KiB segments
            t.log_metrics({"x": float(i)}, step=i)
        t.finish()
        assert len(wait_points(agent_paths, t.run_id, 30_000)) == 30_000
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(list(agent_paths.wal_dir.glob("*.wal"))) > 2:
            time.sleep(0.2)
        assert len(list(agent_paths.wal_dir.glob("*.wal"))) <= 2
    finally:
        agent.stop()


def test_agent_restart_over_a_corrupt_wal_counts_and_keeps_the_rest(agent_paths: AgentPaths,
                                                                   base_config: dict) -> None:
    """Flip a byte inside a middle WAL record while the agent is down: skipped, counted, reported."""
    from flightlog.agent.wal.format import SEGMENT_HEADER_SIZE, Record, scan

    agent = AgentProcess(agent_paths).start()
    t = flightlog.ExperimentTracker("corrupt", base_config)
    for key in ("a", "b", "c"):
        t.log_metrics({key: 1.0}, step=0)
        t.flush()  # one WAL record each
    assert len(wait_points(agent_paths, t.run_id, 3)) == 3  # delivered: the damage below loses nothing
    agent.kill()
    segment = sorted(agent_paths.wal_dir.glob("*.wal"))[-1]
    raw = bytearray(segment.read_bytes())
    records = [r for r in scan(bytes(raw), SEGMENT_HEADER_SIZE, len(raw)) if isinstance(r, Record)]
    middle = records[len(records) // 2]
    raw[middle.offset + middle.size - 12] ^= 0xFF
    segment.write_bytes(bytes(raw))
    agent.start()
    try:
        t.log_metrics({"after": 2.0}, step=1)
        t.finish()
        deadline = time.monotonic() + 30
        keys: set[str] = set()
        while time.monotonic() < deadline and "after" not in keys:
            keys = {p["key"] for p in wait_points(agent_paths, t.run_id, 1)}
        assert keys == {"a", "b", "c", "after"}  # delivered before the damage, and after the restart
        status = json.loads(subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "status", "--json"],
                                           capture_output=True, text=True, check=True).stdout)
        assert status["wal"]["corrupt_records_recovered"] == 1
        inspect = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "wal", "inspect",
                                  str(agent_paths.wal_dir)], capture_output=True, text=True)
        assert inspect.returncode == 0 and "CORRUPT" in inspect.stdout and "bad crc" in inspect.stdout
    finally:
        agent.stop()


def test_full_disk_keeps_the_agent_up_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        base_config: dict) -> None:
    """The agent's disk fills up: ingest stops with a clear alert, events wait in the ring, and once space
    is freed every event arrives exactly once."""
    if os.getuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(small)], check=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    try:
        monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(small / "data"))
        monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(sock_dir / "a.sock"))
        paths = resolve_paths()
        paths.data_dir.mkdir(mode=0o700)
        agent = AgentProcess(paths).start()
        try:
            t = flightlog.ExperimentTracker("full-disk", {**base_config, "agent": {"autostart": False,
                                                                                    "ring_bytes": 1 << 20}})
            t.flush()
            filler = small / "filler"
            with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte (unbuffered: close cannot fail)
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            n = 3000  # ~200 KB: fits in the 1 MiB ring
            for i in range(n):
                t.log_metrics({"x": float(i)}, step=i)
            deadline = time.monotonic() + 30
            alerts: list[str] = []
            while time.monotonic() < deadline and not any("cannot append to the WAL" in a for a in alerts):
                out = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "status", "--json"],
                                     capture_output=True, text=True)
                assert out.returncode == 0, "the agent must stay up on a full disk"
                alerts = json.loads(out.stdout)["alerts"]
                time.sleep(0.3)
            assert any("cannot append to the WAL" in a and str(paths.wal_dir) in a for a in alerts), alerts
            assert agent.proc is not None and agent.proc.poll() is None
            filler.unlink()  # space again
            t.finish()
            assert_exactly_once(wait_points(paths, t.run_id, n), ["x"], n)
        finally:
            agent.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
        shutil.rmtree(sock_dir, ignore_errors=True)
