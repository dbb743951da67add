"""The tracker's control connection to the agent: found or started once, every producer of the run
registered on it (again after a reconnect), requests from any thread one at a time."""
from __future__ import annotations

import logging
import threading
from typing import Any

from flightlog.client import AgentClient, connect_or_start
from flightlog.proto.errors import AgentUnavailable
from flightlog.proto.events import Control, Register, Reply
from flightlog.proto.paths import AgentPaths

__all__ = ["AgentLink"]

log = logging.getLogger("flightlog")


class AgentLink:
    """Connects (or starts a sidecar) and keeps the producers registered. Thread-safe: one lock around
    connecting and each request, so callback threads and checkpoint writers can share it."""

    def __init__(self, paths: AgentPaths, settings: dict[str, Any], *, autostart: bool, timeout: float) -> None:
        self.paths = paths
        self.settings = settings
        self.autostart = autostart
        self.timeout = timeout
        self.client: AgentClient | None = None
        self._registrations: list[Register] = []
        self._lock = threading.RLock()
        self._warned = False  # "no agent yet" is said once per run, not at every reconnect attempt

    @property
    def connected(self) -> bool:
        return self.client is not None

    def connect(self, *, warn: bool = True) -> bool:
        """Find or start the agent and register every producer; False when none can be reached (said once,
        with the reason, unless ``warn`` is False)."""
        with self._lock:
            if self.client is not None:
                return True
            reason = "agent.autostart is off; start one with `flightlog agent`"
            try:
                self.client = connect_or_start(self.paths, self.settings, autostart=self.autostart,
                                               timeout=self.timeout)
            except AgentUnavailable as exc:
                reason = str(exc)
                self.client = None
            if self.client is None:
                if warn and not self._warned:
                    # Training goes on: events wait in the rings and spill files until an agent drains them.
                    self._warned = True
                    log.warning("flightlog: no agent on %s yet (%s); events are kept in %s until an agent runs",
                                self.paths.socket, reason, self.paths.ring_dir)
                return False
            try:
                for reg in self._registrations:
                    self.client.request(reg)
            except AgentUnavailable as exc:
                log.warning("flightlog: the agent on %s went away while registering: %s", self.paths.socket, exc)
                self._drop()
                return False
            return True

    def register(self, reg: Register) -> None:
        """Remember a producer and register it now if connected (the agent opens its ring at once)."""
        with self._lock:
            self._registrations.append(reg)
            if self.client is not None:
                try:
                    self.client.request(reg)
                except AgentUnavailable:
                    self._drop()

    @property
    def producer_ids(self) -> list[str]:
        with self._lock:
            return [reg.producer_id for reg in self._registrations]

    def request(self, message: Control, timeout: float = 30.0, *, reconnect: bool = True) -> Reply:
        """A control request; with ``reconnect`` it reconnects once (an agent restarted after a crash)."""
        with self._lock:
            for attempt in (1, 2):
                if self.client is None and (not reconnect or not self.connect()):
                    raise AgentUnavailable(
                        f"no flightlog agent on {self.paths.socket}; start one with `flightlog agent` "
                        "(events logged so far are kept in shared memory and spill files until then)"
                    )
                assert self.client is not None
                try:
                    return self.client.request(message, timeout=timeout)
                except AgentUnavailable:
                    self._drop()
                    if attempt == 2 or not reconnect:
                        raise
            raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def close(self) -> None:
        with self._lock:
            self._drop()
