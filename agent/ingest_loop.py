"""The ingest loop: drains the rings when a producer rings the doorbell, lingers a few milliseconds while
events flow (so a busy producer never rings), and sleeps otherwise; a slow scan finds new rings, spill
files and finished producers (and bounds any event a lost wake-up would delay)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from flightlog.proto.errors import WALError

from .doorbell import Doorbell
from .ingest import Ingestor

__all__ = ["IngestLoop", "LINGER_SECONDS", "SCAN_SECONDS"]

log = logging.getLogger("flightlog.agent")

#: Awake after a drain that found events: wait this long for more before draining again (batches a flood
#: into few WAL records and thread hops; producers do not ring while the agent is awake).
LINGER_SECONDS = 0.005
#: The safety scan: new rings, spill files, dead producers, and a bound on a wake-up lost to a race.
SCAN_SECONDS = 1.0


class IngestLoop:
    """Owns the draining of every ring; ``ingested`` is set (and replaced) whenever events reached the WAL."""

    def __init__(self, ingestor: Ingestor, doorbell: Doorbell, wal_dir: Path, on_ingested: Callable[[], None],
                 *, linger: float = LINGER_SECONDS, scan_every: float = SCAN_SECONDS) -> None:
        self.ingestor = ingestor
        self.doorbell = doorbell
        self.wal_dir = wal_dir
        self.on_ingested = on_ingested
        self.linger = linger
        self.scan_every = scan_every
        self.ingested = anyio.Event()
        self.rate = 0.0  # events/s, over about the last second
        self.error = ""  # why the WAL refuses appends, while it does (an alert in status)
        self.wakeups = 0  # doorbell wake-ups (status shows it)
        self._rescan = False

    def kick(self, *, rescan: bool = False) -> None:
        """Drain soon, whatever the rings' sleeping words say; ``rescan``: look for new rings first.
        Thread-safe."""
        if rescan:
            self._rescan = True
        self.doorbell.ring()

    async def run(self) -> None:
        while True:
            try:
                await self._pump()
            except (WALError, OSError) as exc:
                # Disk full, most likely. The rings keep every event (read cursors were not advanced):
                # keep the agent up, say so, and try again.
                self.error = f"cannot append to the WAL in {self.wal_dir}: {exc}"
                log.error("%s; events wait in the rings and spill files; retrying in 1 s (free disk space)",
                          self.error)
                await anyio.sleep(1.0)

    async def _pump(self) -> None:
        ing = self.ingestor
        last_scan = -self.scan_every
        t0, n0 = time.monotonic(), ing.events_total
        while True:
            now = time.monotonic()
            if self._rescan or now - last_scan >= self.scan_every:
                # New rings; and the full pass retires idle rings of finished producers.
                self._rescan = False
                await anyio.to_thread.run_sync(ing.scan)
                n = await anyio.to_thread.run_sync(ing.drain)
                last_scan = now
            elif ing.has_pending():  # a few loads on the loop: no thread hop when a ring was a false alarm
                n = await anyio.to_thread.run_sync(ing.drain)
            else:
                n = 0
            if now - t0 >= 1.0:
                self.rate = (ing.events_total - n0) / (now - t0)
                t0, n0 = now, ing.events_total
            if n:
                self.error = ""
                self.on_ingested()
                self.ingested.set()
                self.ingested = anyio.Event()
                await anyio.sleep(self.linger)
                continue
            await self._sleep(last_scan + self.scan_every - time.monotonic())

    async def _sleep(self, timeout: float) -> None:
        """Set the sleeping words, look once more (a frame published before a producer could see the word
        would otherwise wait for the scan), then wait for the doorbell or the next scan."""
        ing = self.ingestor
        ing.set_sleeping(True)
        try:
            # has_pending takes the ring table's lock: a locked instruction, so the stores above are visible
            # before the write words are read again.
            if ing.has_pending():
                return
            if await self.doorbell.wait(timeout):
                self.wakeups += 1
        finally:
            ing.set_sleeping(False)
            self.doorbell.clear()
