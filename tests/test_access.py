"""Access control (issue 13, item 3) with real other uids (65533 and 65534 through ``setpriv``): a single-user
agent turns another uid away; a multi-user agent records the uid that registers a run as its owner and lets
only the owner (members of ``access.group``, root) export it; each refusal is an audit entry."""
from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AgentProcess

from flightlog.agent.access import AccessPolicy
from flightlog.proto.audit import AuditLog
from flightlog.proto.codec import FRAME_HEADER, decode_control, encode_event, frame_control
from flightlog.proto.events import (
    Control,
    EventBatch,
    Metrics,
    Register,
    Reply,
    RunExportRequest,
    RunStart,
)
from flightlog.proto.frames import append_frame
from flightlog.proto.paths import AgentPaths, resolve_paths

OWNER, OTHER = 65533, 65534

# The other user's client is the system Python with the standard library only (ours lives under /root, which
# they cannot enter): it sends the frames it is given, hex-encoded, and prints each reply frame in hex.
CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("the agent closed the connection")
        b += c
    return b
for frame in sys.argv[2:]:
    try:
        s.sendall(bytes.fromhex(frame))
    except OSError:
        pass  # an agent that refuses us has replied and closed: the reply is still there to read
    head = exact(4)
    print((head + exact(int.from_bytes(head, "ORDER"))).hex(), flush=True)
"""


def as_uid(uid: int, sock: Path, messages: list[Control]) -> list[Reply]:
    code = CLIENT.replace("ORDER", "little" if FRAME_HEADER.format.startswith("<") else "big")
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3",
                          "-c", code, str(sock), *(frame_control(m).hex() for m in messages)],
                         capture_output=True, text=True, timeout=60)
    replies = [decode_control(bytes.fromhex(line)[4:]) for line in out.stdout.split()]
    assert len(replies) == len(messages) and all(isinstance(r, Reply) for r in replies), (replies, out.stderr)
    return replies  # type: ignore[return-value]


@pytest.fixture
def open_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentPaths]:
    """Paths under a 0755 folder, the socket's folder 0755 too (a node agent's /run/flightlog)."""
    base = Path(tempfile.mkdtemp(prefix="fl-mu-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "sock").mkdir()
    os.chmod(base / "sock", 0o755)  # whatever the umask (a backend sink earlier in the session may set 077)
    monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(base / "data"))
    monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(base / "sock" / "a.sock"))
    monkeypatch.setenv("FLIGHTLOG_SHM_DIR", str(base / "shm"))
    paths = resolve_paths()
    paths.data_dir.mkdir(mode=0o700)
    yield paths
    shutil.rmtree(base, ignore_errors=True)


def events_of(run_id: str, steps: int) -> bytes:
    buf = bytearray()
    append_frame(buf, encode_event(RunStart(run_id, "mine", time.time())))
    for s in range(steps):
        append_frame(buf, encode_event(Metrics(run_id, s, time.time(), {"loss": float(s)})))
    return bytes(buf)


def test_a_single_user_agent_refuses_another_uid(open_paths: AgentPaths) -> None:
    agent = AgentProcess(open_paths).start()
    try:
        os.chmod(open_paths.socket, 0o666)  # even with the socket opened up, SO_PEERCRED decides
        [reply] = as_uid(OTHER, open_paths.socket, [RunExportRequest("anything")])
    finally:
        agent.stop()
    assert not reply.ok and f"uid {OTHER} may not use this agent" in reply.error and "--multi-user" in reply.error
    refused = [e for e in AuditLog(open_paths.data_dir).entries() if e.action == "access.refused"]
    assert [(e.uid, e.outcome) for e in refused] == [(OTHER, "denied")]


def test_a_multi_user_agent_lets_only_the_owner_read_a_run(open_paths: AgentPaths,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from flightlog.agent.cli import main

    agent = AgentProcess(open_paths, ["--multi-user"]).start()
    sock = open_paths.socket
    try:
        frames = events_of("own1", 10)
        got = as_uid(OWNER, sock, [Register("p-own", "", 1, 0, "own1"), EventBatch("p-own", frames, 11)])
        assert [r.ok for r in got] == [True, True], got
        deadline = time.monotonic() + 60
        while True:  # the owner's export succeeds once the agent stored the events
            [mine] = as_uid(OWNER, sock, [RunExportRequest("own1")])
            if mine.ok and len(mine.data["metrics"]) == 10:
                break
            assert time.monotonic() < deadline, mine
            time.sleep(0.2)
        [theirs] = as_uid(OTHER, sock, [RunExportRequest("own1")])
        assert not theirs.ok and "may not read run own1" in theirs.error and f"uid {OWNER}" in theirs.error
        assert "access.group" in theirs.error
        # Nor can they claim the run, or slip events into it on a connection that did not register them.
        claim, slip = as_uid(OTHER, sock, [Register("p-x", "", 1, 0, "own1"), EventBatch("p-own", frames, 11)])
        assert not claim.ok and f"belongs to uid {OWNER}" in claim.error
        assert not slip.ok and "not registered on this connection" in slip.error
        # Root reads every run, through the agent as well.
        assert main(["runs", "export", "own1", "--via-agent", "--format", "json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["metrics"]) == 10
    finally:
        agent.stop()
    entries = list(AuditLog(open_paths.data_dir).entries())
    refused = [(e.uid, e.object) for e in entries if e.action == "access.refused"]
    assert refused == [(OTHER, "run:own1")], refused
    exports = {e.uid for e in entries if e.action == "run.export"}
    assert {OWNER, 0} <= exports and OTHER not in exports
    assert AuditLog(open_paths.data_dir).verify().ok


def test_the_group_and_root_may_read() -> None:
    nogroup = grp.getgrgid(65534).gr_name  # nobody's primary group
    shared = AccessPolicy(multi_user=True, group=nogroup, own_uid=999)
    assert shared.may_read(OTHER, OWNER)  # a member (primary group) of the group
    assert not shared.may_read(OWNER, OTHER)  # 65533 has no account, so it is in no group
    assert shared.may_read(0, OWNER) and shared.may_read(999, OWNER) and shared.may_read(OWNER, OWNER)
    private = AccessPolicy(multi_user=True, own_uid=999)
    assert not private.may_read(OTHER, OWNER) and not private.may_read(OTHER, None)
    single = AccessPolicy(own_uid=999)
    assert single.may_connect(999) and single.may_connect(0) and not single.may_connect(OTHER)
