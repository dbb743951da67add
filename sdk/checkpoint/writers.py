"""Who writes a staged checkpoint: the agent (over the control socket, waiting on a connection of its own),
or this process with the agent's writer code when there is no agent."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from flightlog.proto.checkpoint.writer import commit_checkpoint, recover_interrupted
from flightlog.proto.errors import AgentUnavailable, CheckpointError
from flightlog.proto.events import CheckpointRequest, CheckpointSpec, CheckpointWait

__all__ = ["LocalWriter", "AgentWriter"]

log = logging.getLogger("flightlog")


class LocalWriter:
    """Writes in this process, with the agent's writer code (no agent, or the agent is gone)."""

    def __init__(self, registry: Path, threads: int = 0) -> None:
        self.registry = registry
        self.threads = threads
        self._recovered = False

    def write(self, spec: CheckpointSpec, on_durable: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
        if not self._recovered:
            recover_interrupted(self.registry)
            self._recovered = True
        return commit_checkpoint(msgspec.to_builtins(spec), self.registry, threads=self.threads,
                                 on_durable=on_durable)


class AgentWriter:
    """Sends the staged checkpoint to the agent and waits on a connection of its own (so a long write
    never holds the tracker's control connection). If the agent dies, it waits for one to come back and
    re-sends the request (the staging buffer is still intact); after ``reconnect_timeout`` it writes the
    checkpoint in this process."""

    def __init__(self, link: Any, paths: Any, local: LocalWriter, reconnect_timeout: float = 60.0) -> None:
        self.link = link  # the tracker's flightlog.link.AgentLink: thread-safe
        self.paths = paths
        self.local = local
        self.reconnect_timeout = reconnect_timeout

    def write(self, spec: CheckpointSpec, on_durable: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
        """The agent answers once the file is durable (its retention runs afterwards); ``on_durable`` is
        only for the in-process writer."""
        if not self.link.connected:
            return self.local.write(spec)
        try:
            reply = self.link.request(CheckpointRequest.of(spec), reconnect=False)
        except AgentUnavailable:
            return self._after_loss(spec)
        if not reply.ok:
            raise CheckpointError(f"the agent refused checkpoint {spec.path}: {reply.error}")
        return self._wait(spec)

    def _connect(self) -> Any:
        from flightlog.proto.control import connect

        return connect(self.paths, timeout=2.0)

    def _wait(self, spec: CheckpointSpec, resent: int = 0) -> dict[str, Any]:
        conn = self._connect()
        if conn is None:
            return self._after_loss(spec, resent)
        try:
            return self._wait_on(conn, spec)
        except AgentUnavailable:
            return self._after_loss(spec, resent)
        finally:
            conn.close()

    @staticmethod
    def _wait_on(conn: Any, spec: CheckpointSpec) -> dict[str, Any]:
        rid = spec.request_id
        while True:
            reply = conn.request(CheckpointWait(rid, timeout=20.0), timeout=40.0)
            if not reply.ok and reply.data.get("unknown"):
                reply = conn.request(CheckpointRequest.of(spec))  # a restarted agent: send it again
                if reply.ok:
                    continue
            if reply.ok:
                return dict(reply.data)
            if not reply.data.get("pending"):
                raise CheckpointError(f"checkpoint {spec.path} failed: {reply.error}")

    def _after_loss(self, spec: CheckpointSpec, resent: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + self.reconnect_timeout
        while resent < 3 and time.monotonic() < deadline:
            conn = self._connect()
            if conn is not None:
                conn.close()
                log.warning("flightlog: the agent was lost while writing %s; re-sending it", spec.path)
                return self._wait(spec, resent + 1)
            time.sleep(0.1)
        log.warning("flightlog: no agent to write %s; writing it in this process", spec.path)
        return self.local.write(spec)
