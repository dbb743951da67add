"""The agent's housekeeping loops, one small class each: WAL retention and the sidecar's idle exit (ingest
and the WAL's group commit are ``ingest_loop``). ``Agent`` wires them into its task group."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .grid import sleep_on_grid

if TYPE_CHECKING:
    from .daemon import Agent

__all__ = ["IdleExitLoop", "RetentionLoop"]

log = logging.getLogger("flightlog.agent")


class RetentionLoop:
    """Delete WAL segments (and uploaded checkpoints' staging) every sink has passed; warn once over the cap."""

    def __init__(self, agent: Agent, period: float = 1.0) -> None:
        self.agent = agent
        self.period = period

    async def run(self) -> None:
        agent = self.agent
        wal = agent.wal
        warned = False
        done = clean = uploads = -1
        while True:
            await sleep_on_grid(self.period)
            low = agent._min_cursor_seq()
            # A thread hop only when a sink moved and old segments may be left (every sink in the live
            # segment: all before it is gone), or uploaded checkpoints' links may wait.
            if low != done and not (low >= wal.active_first_seq and clean == wal.active_first_seq):
                done = low
                deleted = await anyio.to_thread.run_sync(wal.delete_before, low)
                if deleted:
                    log.info("WAL: deleted %d segments every sink has passed", len(deleted))
                if low >= wal.active_first_seq:
                    clean = wal.active_first_seq
            if low != uploads and agent.checkpoints.upload_dir.exists():
                uploads = low
                await anyio.to_thread.run_sync(agent.checkpoints.delete_uploaded, low)
            cap = agent.settings.max_wal_bytes
            if cap and wal.total_bytes() > cap and not warned:
                warned = True
                lagging = [r.sink.name for r in agent.runners if r.stats.cursor.seq == agent._min_cursor_seq()]
                log.warning(
                    "WAL holds %d bytes, over wal.max_bytes=%d, because sink(s) %s lag; nothing is deleted "
                    "until they catch up: fix the backend or `flightlog wal replay` it elsewhere",
                    wal.total_bytes(), cap, ", ".join(lagging),
                )


class IdleExitLoop:
    """A sidecar stops once no producer is left, every sink caught up (or the drain timeout passed) and it
    has been idle for ``idle_exit_seconds``. It looks every ``period`` while the exit draws near, and once a
    second while producers are there (a trickle's agent should not wake ten times a second for this)."""

    def __init__(self, agent: Agent, stop: Callable[[], None], period: float = 0.1, busy_period: float = 1.0) -> None:
        self.agent = agent
        self.stop = stop
        self.period = period
        self.busy_period = busy_period

    def _no_producers(self) -> bool:
        a = self.agent
        return a.clients == 0 and not a.ingestor.rings and not a.checkpoints.busy()

    async def run(self) -> None:
        agent = self.agent
        s = agent.settings
        idle_since: float | None = None
        gone_since: float | None = None
        period = self.period
        while True:
            await sleep_on_grid(period)
            now = time.monotonic()
            if not self._no_producers():
                idle_since = gone_since = None
                period = self.busy_period
                continue
            period = self.period
            gone_since = gone_since or now
            if not agent._caught_up() and now - gone_since < s.drain_timeout_seconds:
                idle_since = None
                continue
            idle_since = idle_since or now
            if now - idle_since >= s.idle_exit_seconds:
                if now - gone_since < s.drain_timeout_seconds and await anyio.to_thread.run_sync(
                        agent.plots.pending):
                    idle_since = None  # a run's final plots are still to come: render and deliver them first
                    continue
                if not agent._caught_up():
                    log.warning("sidecar exiting with undelivered events; they stay in the WAL for the next agent")
                self.stop()
                return
