"""The control connection both processes speak: a blocking request/reply client over the agent's Unix socket
(the SDK's tracker and the agent's CLI use it; the agent's server side is ``flightlog.agent.control``)."""
from __future__ import annotations

import os
import socket
import threading

from flightlog.proto.codec import FRAME_HEADER, decode_control, frame_control
from flightlog.proto.errors import AgentUnavailable, ProtocolError
from flightlog.proto.events import SCHEMA_VERSION, Control, Hello, Reply
from flightlog.proto.paths import AgentPaths

__all__ = ["AgentClient", "connect", "AGENT_LOCKED_EXIT"]

#: Exit status of an agent that found another one owning its data directory (the starter then connects to it).
AGENT_LOCKED_EXIT = 3


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
        except (TimeoutError, OSError) as exc:
            raise AgentUnavailable(f"agent at {self.path} did not answer: {exc}") from exc
        if not isinstance(reply, Reply):
            raise ProtocolError(f"agent at {self.path} sent {type(reply).__name__}, expected a reply")
        return reply

    def request_fds(self, message: Control, timeout: float = 30.0) -> tuple[Reply, list[int]]:
        """A request whose ok reply says ``data["fds"]`` file descriptors follow (SCM_RIGHTS, on one byte)."""
        with self._lock:
            reply = self._request(message, timeout)
            count = int(reply.data.get("fds", 0)) if reply.ok else 0
            if not count:
                return reply, []
            try:
                _, fds, flags, _ = socket.recv_fds(self._sock, 1, count)
            except (TimeoutError, OSError) as exc:
                raise AgentUnavailable(f"agent at {self.path} did not hand over its files: {exc}") from exc
            if len(fds) != count or flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError(f"agent at {self.path} announced {count} files and handed over {len(fds)}")
            return reply, fds

    def _recv_exact(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self._sock.recv(n - len(chunks))
            if not chunk:
                raise ConnectionResetError("agent closed the connection")
            chunks += chunk
        return bytes(chunks)

    def shutdown(self) -> None:
        """Wake a thread blocked in ``request`` on this connection (it raises AgentUnavailable); any thread."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

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
