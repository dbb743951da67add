"""The audit log (issue 13, item 4): every data access and destructive action leaves one entry; any edit,
deletion, reordering or truncation makes ``flightlog audit verify`` fail naming the first bad entry."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.agent.audit_cli import parse_since
from flightlog.agent.cli import main
from flightlog.proto.audit import (
    AUDIT_KEY,
    AUDIT_LOG,
    AUDIT_SEAL,
    MISMATCH,
    AuditLog,
    Seal,
    key_use,
    parse_entry,
    record,
    seal_mac,
    verify_lines,
)
from flightlog.proto.errors import AuditCorrupt, AuditError

N = 6


def filled(data: Path, n: int = N) -> AuditLog:
    audit = AuditLog(data)
    for i in range(n):
        audit.append("run.export", f"run:r{i}", run=f"r{i}")
    return audit


def lines_of(audit: AuditLog) -> list[bytes]:
    return audit.path.read_bytes().splitlines()


def rewrite(audit: AuditLog, lines: list[bytes]) -> None:
    audit.path.write_bytes(b"".join(line + b"\n" for line in lines))


def verify_cli(data: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", "verify", "--data-dir", str(data)])
    return code, capsys.readouterr().out


def test_an_intact_log_verifies_and_is_private(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = filled(tmp_path)
    assert audit.verify().ok and audit.verify().entries == N
    code, out = verify_cli(tmp_path, capsys)
    assert code == 0 and f"{N} entries" in out
    for name in (AUDIT_LOG, AUDIT_KEY, AUDIT_SEAL):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    first = parse_entry(lines_of(audit)[0])
    assert (first.uid, first.pid, first.action, first.object, first.outcome) == \
        (os.getuid(), os.getpid(), "run.export", "run:r0", "ok")
    assert first.user and first.host and first.time > 0


@pytest.mark.parametrize("i", range(N))
def test_an_edited_entry_is_named(tmp_path: Path, i: int, capsys: pytest.CaptureFixture[str]) -> None:
    audit = filled(tmp_path)
    lines = lines_of(audit)
    lines[i] = lines[i].replace(f"run:r{i}".encode(), b"run:zz")
    rewrite(audit, lines)
    v = audit.verify()
    assert not v.ok and v.bad_entry == i, v
    code, out = verify_cli(tmp_path, capsys)
    assert code == 1 and f"entry {i} (line {i + 1})" in out and "TAMPERED" in out


@pytest.mark.parametrize("i", range(N))
def test_a_deleted_entry_is_named(tmp_path: Path, i: int) -> None:
    audit = filled(tmp_path)
    lines = lines_of(audit)
    del lines[i]
    rewrite(audit, lines)
    v = audit.verify()
    assert not v.ok and v.bad_entry == i, v
    assert ("deleted" in v.problem) if i < N - 1 else ("truncated" in v.problem)


@pytest.mark.parametrize("i", range(N - 1))
def test_reordered_entries_are_named(tmp_path: Path, i: int) -> None:
    audit = filled(tmp_path)
    lines = lines_of(audit)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    rewrite(audit, lines)
    v = audit.verify()
    assert not v.ok and v.bad_entry == i and "reordered" in v.problem, v


@pytest.mark.parametrize("keep", [0, 1, N - 1])
def test_truncation_is_caught_by_the_seal(tmp_path: Path, keep: int) -> None:
    audit = filled(tmp_path)
    rewrite(audit, lines_of(audit)[:keep])
    v = audit.verify()
    assert not v.ok and v.bad_entry == keep and "truncated" in v.problem, v


def test_a_cut_in_the_middle_of_a_line_is_caught(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    data = audit.path.read_bytes()
    audit.path.write_bytes(data[: len(data) - 10])
    v = audit.verify()
    assert not v.ok and v.bad_entry == N - 1, v


def test_a_cut_mid_line_then_an_append_keeps_the_evidence_on_its_own_line(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    data = audit.path.read_bytes()
    audit.path.write_bytes(data[: len(data) - 10])
    AuditLog(tmp_path).append("run.export", "run:later")
    lines = lines_of(audit)
    assert [parse_entry(x).action for x in lines[N:]] == [MISMATCH, "run.export"]
    v = audit.verify()
    assert not v.ok and v.bad_entry == N - 1, v


def test_truncation_stays_evident_after_later_appends(tmp_path: Path) -> None:
    """Cut the log, then let flightlog append again: the new seal would cover the cut, so the append
    records the mismatch first, in the chain, and verify names it."""
    audit = filled(tmp_path)
    rewrite(audit, lines_of(audit)[:3])
    AuditLog(tmp_path).append("run.export", "run:later")
    entries = [parse_entry(x) for x in lines_of(audit)]
    assert [e.action for e in entries[3:]] == [MISMATCH, "run.export"]
    v = audit.verify()
    assert not v.ok and v.bad_entry == 3 and "did not match its seal" in v.problem, v


def test_a_forged_or_missing_seal_is_caught(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    seal = audit.read_seal()
    assert seal is not None
    audit.seal_path.write_bytes(json.dumps({"count": 3, "head": seal.head, "mac": seal.mac}).encode())
    assert "not authentic" in audit.verify().problem
    audit.seal_path.unlink()
    assert not audit.verify().ok and "no seal" in audit.verify().problem
    filled(tmp_path / "b")
    (tmp_path / "b" / AUDIT_KEY).unlink()
    assert "key" in AuditLog(tmp_path / "b").verify().problem


def test_rechaining_after_an_edit_without_the_key_is_caught(tmp_path: Path) -> None:
    """Recompute every hash after an edit (what someone without the key can do): the seal says no."""
    import msgspec

    from flightlog.proto.audit import GENESIS, AuditEntry, entry_hash

    audit = filled(tmp_path)
    prev, out = GENESIS, []
    for line in lines_of(audit):
        e = msgspec.json.decode(line, type=AuditEntry)
        e.prev = prev
        e.object = e.object.replace("r2", "zz")
        enc = msgspec.json.encode(e)
        out.append(enc)
        prev = entry_hash(enc)
    rewrite(audit, out)
    v = audit.verify()
    assert not v.ok and v.bad_entry == N - 1 and "seal" in v.problem


def _append_many(data: str, n: int) -> None:
    a = AuditLog(data)
    for i in range(n):
        a.append("checkpoint.load", f"/c/{os.getpid()}-{i}")


def test_appends_from_several_processes_keep_one_chain(tmp_path: Path) -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_audit import _append_many; "
            "_append_many(sys.argv[1], 25)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent)])
             for _ in range(4)]
    _append_many(str(tmp_path), 25)
    assert all(p.wait(60) == 0 for p in procs)
    v = AuditLog(tmp_path).verify()
    assert v.ok and v.entries == 125, v


def test_a_symlink_in_place_of_the_log_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    (data / AUDIT_LOG).symlink_to(target)
    with pytest.raises(AuditError, match="symbolic link"):
        AuditLog(data).append("run.export", "run:x")
    assert target.read_bytes() == b""


def test_ls_filters_by_run_and_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    filled(tmp_path)
    assert main(["audit", "ls", "--data-dir", str(tmp_path), "--run", "r2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["object"] for r in rows] == ["run:r2"]
    assert main(["audit", "ls", "--data-dir", str(tmp_path), "--since", "1h"]) == 0
    assert capsys.readouterr().out.count("run.export") == N
    assert main(["audit", "ls", "--data-dir", str(tmp_path), "--since", "2999-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert main(["audit", "ls", "--data-dir", str(tmp_path), "--since", "yesterday-ish"]) == 1


# --- every action leaves one entry --------------------------------------------------------------


def actions(data: Path) -> list[tuple[str, str]]:
    return [(e.action, e.outcome) for e in AuditLog(data).entries()]


def test_cli_reads_and_the_checkpoint_paths_each_leave_one_entry(
        agent_paths: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from test_plots import fill_store

    from flightlog.checkpoint import ModelCheckpointer

    data = agent_paths.data_dir
    fill_store(agent_paths.store, "r1", 30)
    loc = ["--data-dir", str(data)]
    assert main(["runs", "export", "r1", *loc, "--out", str(tmp_path / "x.jsonl")]) == 0
    assert actions(data) == [("run.export", "ok")]
    assert main(["plot", "r1", *loc, "--out", str(tmp_path / "plots")]) == 0
    assert actions(data)[-1] == ("run.plot", "ok")
    ck = ModelCheckpointer(tmp_path / "ckpt", staging_dir=tmp_path / "stage", max_checkpoints=1, run_id="r1")
    try:
        model = torch.nn.Linear(2, 2)
        saved = [ck.save(model, epoch=0, step=s).wait() for s in range(2)]
        ck.wait_all()
        ck.load("latest", model)
    finally:
        ck.close()
    got = actions(data)
    assert got[2:] == [("checkpoint.retention_delete", "ok"), ("checkpoint.load", "ok")], got
    assert main(["ckpt", "export", saved[-1].path, "--dir", str(tmp_path / "ckpt"), *loc,
                 "--to", str(tmp_path / "plain.safetensors")]) == 0
    assert actions(data)[-1] == ("checkpoint.export", "ok")
    assert main(["ckpt", "rm", saved[-1].path, "--dir", str(tmp_path / "ckpt"), *loc]) == 0
    assert actions(data)[-1] == ("checkpoint.delete", "ok") and not Path(saved[-1].path).exists()
    assert main(["ckpt", "rm", saved[-1].path, "--dir", str(tmp_path / "ckpt"), *loc]) == 1  # not twice
    assert main(["wal", "replay", str(tmp_path / "nowal"), *loc, "--to", f"store={tmp_path}/s.db"]) == 1
    (data / "wal").mkdir()
    capsys.readouterr()
    main(["wal", "replay", *loc, "--to", f"store={tmp_path}/s.db", "--no-progress"])
    assert actions(data)[-1] == ("wal.replay", "ok")
    key_use("k1", "decrypt", "/c/x.safetensors", data_dir=data, run="r1")
    last = list(AuditLog(data).entries())[-1]
    assert (last.action, last.detail, last.run) == ("key.use", "key k1: decrypt", "r1")
    assert AuditLog(data).verify().ok


def test_record_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    record("run.export", "run:x", data_dir=tmp_path / "file" / "sub")  # a data dir that cannot exist
    assert "could not append" in caplog.text


# --- the parser of outside bytes -----------------------------------------------------------------

_line = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
        st.sampled_from(["seq", "time", "uid", "user", "pid", "host", "action", "object", "outcome", "prev",
                         "run", "detail", "x"]),
        st.one_of(st.integers(-5, 2**70), st.floats(allow_nan=True), st.text(max_size=70), st.none()),
        max_size=13)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, max_size=8), count=st.integers(-3, 10), head=st.text(max_size=70))
def test_verify_never_raises_on_arbitrary_bytes(lines: list[bytes], count: int, head: str) -> None:
    key = b"k" * 32
    for seal in (None, Seal(count, head, seal_mac(key, count, head))):
        v = verify_lines(lines, seal, key)
        if not lines:
            assert v.ok == (seal is None or (count == 0 and head == "0" * 64))
        elif not v.ok:
            assert v.bad_entry is None or 0 <= v.bad_entry <= len(lines)
    for line in lines:
        try:
            parse_entry(line)
        except AuditCorrupt:
            pass


def test_an_oversized_line_is_refused_before_parsing(tmp_path: Path) -> None:
    audit = filled(tmp_path, 2)
    with audit.path.open("ab") as f:
        f.write(b"[" * (1 << 20) + b"\n")
    t = time.monotonic()
    v = audit.verify()
    assert not v.ok and v.bad_entry == 2 and "limit" in v.problem and time.monotonic() - t < 5
