"""A run's plots and checkpoints through a real multi-user agent (issue 13, item 3): the agent checks the
caller's uid (``SO_PEERCRED``, real other uids through ``setpriv``) against the run's owner and hands the open
files over (SCM_RIGHTS); other uids are refused; each hand-over and refusal is an audit entry."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import AgentProcess
from safetensors.numpy import load_file
from test_access import OTHER, OWNER, as_uid, events_of, open_paths  # noqa: F401  (open_paths: a fixture)

from flightlog.agent.cli import main
from flightlog.proto.audit import AuditLog
from flightlog.proto.checkpoint.format import TensorInfo, checksum_text
from flightlog.proto.checkpoint.registry import Registry
from flightlog.proto.checkpoint.writer import write_container
from flightlog.proto.codec import FRAME_HEADER, decode_control, frame_control
from flightlog.proto.events import Control, EventBatch, Register, Reply, RunExportRequest, RunFilesRequest
from flightlog.proto.paths import AgentPaths

# The other user's client (the system Python, standard library only): for each "1" request it also takes the
# descriptors the agent hands over after the reply, and prints the size and SHA-256 of what each one reads.
FD_CLIENT = r"""
import hashlib, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(30)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("the agent closed the connection")
        b += c
    return b
for item in sys.argv[2:]:
    want, frame = item.split(":")
    s.sendall(bytes.fromhex(frame))
    head = exact(4)
    print("R", (head + exact(int.from_bytes(head, "ORDER"))).hex(), flush=True)
    if want == "1":
        _, fds, _, _ = socket.recv_fds(s, 1, 64)
        for fd in fds:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            print("F", len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def fd_client(uid: int, sock: Path, requests: list[tuple[bool, Control]]) -> list[tuple[Reply, list[str]]]:
    code = FD_CLIENT.replace("ORDER", "little" if FRAME_HEADER.format.startswith("<") else "big")
    args = [f"{int(fds)}:{frame_control(m).hex()}" for fds, m in requests]
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3",
                          "-c", code, str(sock), *args], capture_output=True, text=True, timeout=120)
    got: list[tuple[Reply, list[str]]] = []
    for line in out.stdout.splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "R":
            reply = decode_control(bytes.fromhex(rest)[4:])
            assert isinstance(reply, Reply)
            got.append((reply, []))
        else:
            got[-1][1].append(rest)
    assert len(got) == len(requests), (got, out.stderr)
    return got


def _checkpoint(paths: AgentPaths, run_id: str) -> tuple[Path, bytes]:
    """A checkpoint file of ``run_id`` in a private folder of the agent's, registered as the agent does."""
    folder = paths.data_dir / "ckpt"
    folder.mkdir(mode=0o700)
    path = folder / "epoch1.flck"
    payload = bytes(range(256)) * 64
    spec = {"path": str(path), "run_id": run_id, "epoch": 1, "step": 2, "codec": "zstd", "level": 1}
    with Registry(paths.store) as reg:
        reg.begin(spec, str(path) + ".tmp")
        with open(path, "wb") as f:
            size, digest = write_container(f, [TensorInfo("layer.w", "U8", (len(payload),), 0, len(payload))],
                                           {"flightlog": json.dumps({"epoch": 1, "step": 2})},
                                           memoryview(bytearray(payload)), "zstd", 1, threads=1)
        reg.commit(spec, size, checksum_text(digest))
    os.chmod(path, 0o600)
    return path, payload


def _sha(path: Path) -> str:
    return f"{path.stat().st_size} {hashlib.sha256(path.read_bytes()).hexdigest()}"


def test_plots_and_checkpoints_are_handed_over_to_the_owner_only(open_paths: AgentPaths, tmp_path: Path,  # noqa: F811
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    agent = AgentProcess(open_paths, ["--multi-user"]).start()
    sock = open_paths.socket
    try:
        got = as_uid(OWNER, sock, [Register("p-own", "", 1, 0, "own1"), EventBatch("p-own", events_of("own1", 5), 6)])
        assert all(r.ok for r in got), got
        deadline = time.monotonic() + 60
        while not ((r := as_uid(OWNER, sock, [RunExportRequest("own1")])[0]).ok and len(r.data["metrics"]) == 5):
            assert time.monotonic() < deadline, r
            time.sleep(0.2)
        ckpt, payload = _checkpoint(open_paths, "own1")
        (plots, pngs), (mine, blob), (stray, _) = fd_client(OWNER, sock, [
            (True, RunFilesRequest("own1", "plots")), (True, RunFilesRequest("", "checkpoint", str(ckpt))),
            (False, RunFilesRequest("", "checkpoint", "/etc/shadow"))])
        assert plots.ok and "loss.png" in plots.data["names"] and len(pngs) == len(plots.data["names"]), plots
        folder = open_paths.run_dir("own1") / "plots"
        assert sorted(pngs) == sorted(_sha(folder / n) for n in plots.data["names"])
        assert mine.ok and blob == [_sha(ckpt)], mine
        assert not stray.ok and "not a durable checkpoint" in stray.error
        (p2, none1), (c2, none2) = fd_client(OTHER, sock, [(False, RunFilesRequest("own1", "plots")),
                                                           (False, RunFilesRequest("", "checkpoint", str(ckpt)))])
        for refused, nothing in ((p2, none1), (c2, none2)):
            assert not refused.ok and "may not read run own1" in refused.error and f"uid {OWNER}" in refused.error
            assert nothing == []
        # Root through the command line: the plots copied out, the checkpoint exported from the handed-over file.
        assert main(["plot", "own1", "--via-agent", "--out", str(tmp_path / "plots")]) == 0
        assert (tmp_path / "plots" / "loss.png").read_bytes() == (folder / "loss.png").read_bytes()
        assert main(["ckpt", "export", str(ckpt), "--to", str(tmp_path / "w.safetensors"), "--via-agent"]) == 0
        assert load_file(str(tmp_path / "w.safetensors"))["layer.w"].tobytes() == payload
        assert not list(tmp_path.glob(".*.fetch"))  # the private copy is gone
    finally:
        agent.stop()
    entries = [(e.action, e.object, e.outcome, e.uid) for e in AuditLog(open_paths.data_dir).entries()
               if e.action in ("run.plot", "checkpoint.load", "access.refused")]
    assert entries == [("run.plot", "run:own1", "ok", OWNER), ("checkpoint.load", str(ckpt), "ok", OWNER),
                       ("access.refused", "run:own1", "denied", OTHER),
                       ("access.refused", str(ckpt), "denied", OTHER),
                       ("run.plot", "run:own1", "ok", 0), ("checkpoint.load", str(ckpt), "ok", 0)]
    assert AuditLog(open_paths.data_dir).verify().ok
