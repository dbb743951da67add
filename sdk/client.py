"""The SDK's side of the control socket: find the agent, or start one as a detached sidecar."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from flightlog.paths import AgentPaths, ensure_private_dir
from flightlog.proto.codec import FRAME_HEADER, decode_control, frame_control
from flightlog.proto.errors import AgentUnavailable, ProtocolError
from flightlog.proto.events import SCHEMA_VERSION, Control, Hello, Reply

__all__ = ["AgentClient", "connect", "start_sidecar", "connect_or_start"]

log = logging.getLogger("flightlog")


class AgentClient:
    """A blocking request/reply connection to the agent. Never used on the logging hot path."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self.path = path
        self._lock = threading.Lock()  # one request/reply at a time (checkpoint threads share it)

    def request(self, message: Control, timeout: float = 30.0) -> Reply:
        with self._lock:
            return self._request(message, timeout)

    def _request(self, message: Control, timeout: float) -> Reply:
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(frame_control(message))
            header = self._recv_exact(4)
            (n,) = FRAME_HEADER.unpack(header)
            reply = decode_control(self._recv_exact(n))
        except (OSError, socket.timeout) as exc:
            raise AgentUnavailable(f"agent at {self.path} did not answer: {exc}") from exc
        if not isinstance(reply, Reply):
            raise ProtocolError(f"agent at {self.path} sent {type(reply).__name__}, expected a reply")
        return reply

    def _recv_exact(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self._sock.recv(n - len(chunks))
            if not chunk:
                raise ConnectionResetError("agent closed the connection")
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def connect(paths: AgentPaths, timeout: float = 5.0) -> AgentClient | None:
    """Connect to a running agent, or return None if none listens on the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(paths.socket))
    except OSError:
        s.close()
        return None
    client = AgentClient(s, str(paths.socket))
    try:
        reply = client.request(Hello(schema=SCHEMA_VERSION, pid=os.getpid()), timeout=timeout)
    except (AgentUnavailable, ProtocolError):
        client.close()
        return None
    if not reply.ok:
        client.close()
        raise AgentUnavailable(f"agent at {paths.socket} refused this process: {reply.error}")
    return client


#: Sidecars this process started; kept referenced so Popen never warns about a running child.
_sidecars: list[subprocess.Popen[bytes]] = []


def start_sidecar(paths: AgentPaths, settings: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start ``python -m flightlog.agent`` detached: it outlives the trainer until it has drained."""
    ensure_private_dir(paths.data_dir)
    ensure_private_dir(paths.socket.parent)
    logfile = open(paths.log, "ab")
    try:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "flightlog.agent", "--sidecar",
                "--data-dir", str(paths.data_dir), "--socket", str(paths.socket),
                "--settings-json", json.dumps(settings),
            ],
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    finally:
        logfile.close()
    _sidecars.append(proc)
    return proc


def connect_or_start(paths: AgentPaths, settings: dict[str, Any], *, autostart: bool, timeout: float) -> AgentClient | None:
    client = connect(paths)
    if client is not None or not autostart:
        return client
    proc = start_sidecar(paths, settings)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        client = connect(paths)
        if client is not None:
            return client
        code = proc.poll()
        if code is not None and code != 3:  # 3: another agent holds the lock; keep trying to connect to it
            raise AgentUnavailable(
                f"the flightlog agent exited with code {code} at start; see {paths.log}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise AgentUnavailable(
        f"no flightlog agent answered on {paths.socket} within {timeout:.0f} s; see {paths.log}"
    )
