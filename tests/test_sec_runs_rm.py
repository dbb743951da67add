"""``flightlog runs rm`` (issue 13, run deletion outside the UI): asked for first, a running run refused, each
outcome an audit entry; through a real multi-user agent only the owner (access.group, root) may delete."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from conftest import AgentProcess
from test_access import OTHER, OWNER, as_uid, events_of, open_paths  # noqa: F401  (open_paths: a fixture)

from flightlog.agent.cli import main
from flightlog.agent.store import Store
from flightlog.proto.audit import AuditLog
from flightlog.proto.codec import encode_event
from flightlog.proto.events import EventBatch, Metrics, Register, RunDeleteRequest, RunEnd, RunExportRequest, RunStart
from flightlog.proto.frames import append_frame
from flightlog.proto.paths import AgentPaths


def _store_with_runs(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700, exist_ok=True)
    store = Store(data_dir / "flightlog.db")
    with store.transaction():
        for rid in ("done1", "live1"):
            store.apply([RunStart(rid, f"exp-{rid}", 1_000.0), Metrics(rid, 0, 1_000.0, {"loss": 1.0})])
        store.apply([RunEnd("done1", "completed", 2_000.0)])
    store.close()


def _run_ids(data_dir: Path) -> set[str]:
    store = Store(data_dir / "flightlog.db", readonly=True)
    try:
        return {r["run_id"] for r in store.runs()}
    finally:
        store.close()


def test_runs_rm_asks_refuses_a_running_run_and_audits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _store_with_runs(data)
    where = ["--data-dir", str(data)]
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert main(["runs", "rm", "done1", *where]) == 1
    assert "not confirmed" in capsys.readouterr().err and _run_ids(data) == {"done1", "live1"}
    assert main(["runs", "rm", "live1", "--yes", *where]) == 1
    assert "still running" in capsys.readouterr().err and _run_ids(data) == {"done1", "live1"}
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert main(["runs", "rm", "exp-done1", *where]) == 0  # by name, as every runs command takes it
    assert "deleted run done1" in capsys.readouterr().out and _run_ids(data) == {"live1"}
    entries = [(e.action, e.object, e.outcome) for e in AuditLog(data).entries() if e.action == "run.delete"]
    assert entries == [("run.delete", "run:live1", "refused"), ("run.delete", "run:done1", "ok")]
    assert AuditLog(data).verify().ok


def _ended(run_id: str) -> bytes:
    frames = bytearray(events_of(run_id, 3))
    append_frame(frames, encode_event(RunEnd(run_id, "completed", time.time())))
    return bytes(frames)


def test_a_multi_user_agent_deletes_only_for_the_owner(open_paths: AgentPaths,  # noqa: F811
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    agent = AgentProcess(open_paths, ["--multi-user"]).start()
    sock = open_paths.socket
    try:
        for rid in ("own2", "own3"):
            got = as_uid(OWNER, sock, [Register(f"p-{rid}", "", 1, 0, rid), EventBatch(f"p-{rid}", _ended(rid), 5)])
            assert all(r.ok for r in got), got
        deadline = time.monotonic() + 60
        while not all(r.ok and r.data.get("status") == "completed"
                      for r in as_uid(OWNER, sock, [RunExportRequest("own2"), RunExportRequest("own3")])):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        [theirs] = as_uid(OTHER, sock, [RunDeleteRequest("own2")])
        assert not theirs.ok and "may not delete run own2" in theirs.error and f"uid {OWNER}" in theirs.error
        [still] = as_uid(OWNER, sock, [RunExportRequest("own2")])
        assert still.ok and len(still.data["metrics"]) == 3
        [mine] = as_uid(OWNER, sock, [RunDeleteRequest("own2")])
        assert mine.ok and mine.data["run_id"] == "own2" and mine.data["rows"] > 0, mine
        [gone] = as_uid(OWNER, sock, [RunExportRequest("own2")])
        assert not gone.ok and "own2" in gone.error
        # Root, through the agent by the command line: the store is the agent's.
        assert main(["runs", "rm", "own3", "--via-agent", "--yes"]) == 0
        assert "deleted run own3" in capsys.readouterr().out
    finally:
        agent.stop()
    entries = [(e.action, e.object, e.outcome, e.uid) for e in AuditLog(open_paths.data_dir).entries()
               if e.action in ("run.delete", "access.refused")]
    assert entries == [("access.refused", "run:own2", "denied", OTHER), ("run.delete", "run:own2", "ok", OWNER),
                       ("run.delete", "run:own3", "ok", 0)]
    assert AuditLog(open_paths.data_dir).verify().ok
