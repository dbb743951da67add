"""The agent's doorbell: a Unix datagram socket next to the rings that producers write one byte to when they
publish a frame into a ring whose sleeping word is set (see ``flightlog.proto.ring``)."""
from __future__ import annotations

import os
import select
import socket
from pathlib import Path

__all__ = ["Doorbell"]


class Doorbell:
    """Bound by the agent (which holds the data directory's lock, so a socket file already there is stale)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)  # the ring directory is 0700 already; the socket says the same
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._kick = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # for ring(): any thread, never blocks
        self._kick.setblocking(False)

    def wait(self, timeout: float) -> bool:
        """Block (the ingest loop's own thread) until rung (True) or ``timeout`` seconds passed (False).
        Datagrams stay queued: see ``clear``."""
        if timeout <= 0:
            return False
        return bool(self._poll.poll(max(1, int(timeout * 1000 + 0.999))))

    def clear(self) -> int:
        """Read every queued ring; returns how many there were."""
        n = 0
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return n
            n += 1

    def ring(self) -> None:
        """Wake the ingest loop from inside the agent (a producer registered, a flush wants its events)."""
        try:
            self._kick.sendto(b"\x02", str(self.path))
        except OSError:
            pass  # the buffer is full of rings already: the loop wakes anyway

    def close(self) -> None:
        self._kick.close()
        self._sock.close()
        self.path.unlink(missing_ok=True)
