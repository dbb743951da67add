"""The ingest loop: one worker thread that sleeps on the doorbell, drains the rings when a producer rings,
and works in windows of ``linger`` seconds: what reaches the rings within a window is drained, made durable
(one fsync, ``wal.fsync: interval``) and handed to the sinks in one go at its end, so a trickle of ten or a
hundred events a second costs a few wake-ups a second, not one per event. While events keep coming the loop
looks again after each window without setting the sleeping word (producers do not ring); a window that finds
nothing puts it back to sleep on the doorbell. From STREAM_RATE events/s on, a window holds hundreds of
events anyway: the loop then drains every 100 ms and the sinks take each batch at once. A flood does not
wait. A slow scan finds new rings, spill files and finished producers (and bounds any event a lost wake-up
would delay).

The window is also the sinks' linger: ``since`` (when the oldest event of the batch may have arrived) goes to
the runners with the wake-up, so a sink's own linger counts from there and an event waits about one window in
all, not a window here and a linger there (``agent.linger_ms``; the delivery latency budget is 0.5 s p99).

A thread of its own rather than event-loop tasks: a wake-up then costs a syscall and a drain, not three
hops between the loop and the thread pool. Measured here, each wake-up of an idle agent costs a few hundred
µs of CPU whatever it carries (cold caches, the fsync's block I/O): at a trickle the number of wake-ups is
the agent's cost. It is owned by the agent's task group like any task (``run``), and stops when cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel

from flightlog.proto.config import AgentConfig
from flightlog.proto.errors import WALError

from .doorbell import Doorbell
from .ingest import Ingestor
from .owned_thread import run_owned_thread

__all__ = ["LINGER_SECONDS", "SCAN_SECONDS", "STREAM_RATE", "IngestLoop"]

log = logging.getLogger("flightlog.agent")

#: The batching window (and the sinks' linger, see the module docstring): ``agent.linger_ms``'s default.
LINGER_SECONDS = AgentConfig().linger_ms / 1000.0
#: A drain of at least this many events means a flood: drain again at once rather than linger.
FLOOD_EVENTS = 4096
#: During a flood, ``on_ingested`` (it wakes the sinks) runs at most this often: sinks batch anyway.
NOTIFY_SECONDS = 0.1
#: At this rate (events/s) and above a window holds hundreds of events: batching longer saves nothing worth
#: the delay, so the loop drains every STREAM_SECONDS and the sinks take each batch at once.
STREAM_RATE = 2000.0
STREAM_SECONDS = 0.1
#: The safety scan: new rings, spill files, dead producers, and a bound on a wake-up lost to a race.
SCAN_SECONDS = 1.0


class IngestLoop:
    """Owns the draining of every ring. ``on_ingested`` runs on the event loop after events reached the WAL."""

    def __init__(self, ingestor: Ingestor, doorbell: Doorbell, wal_dir: Path, on_ingested: Callable[[], None],
                 *, linger: float = LINGER_SECONDS, scan_every: float = SCAN_SECONDS,
                 fsync_every: float | None = None, on_ingested_threadsafe: bool = False) -> None:
        self.ingestor = ingestor
        self.wal = ingestor.wal
        self.fsync_every = fsync_every  # None: the WAL syncs on every append ("always") or never
        self.doorbell = doorbell
        self.wal_dir = wal_dir
        self.on_ingested = on_ingested
        # False: on_ingested must run on the event loop (a round trip to it per drain); True: call it here.
        self.on_ingested_threadsafe = on_ingested_threadsafe
        self.linger = linger
        self.scan_every = scan_every
        self.rate = 0.0  # events/s, over about the last second
        self.error = ""  # why the WAL refuses appends, while it does (an alert in status)
        self.wakeups = 0  # doorbell wake-ups (status shows it)
        self._rescan = False
        self._synced = 0.0  # monotonic time of the last group commit
        self._unnotified = False  # events reached the WAL since on_ingested last ran
        self._notified = -NOTIFY_SECONDS
        self._slept = 0.0  # how long the last doorbell sleep lasted: events come sparsely, or in a stream
        self._kicked = False  # a kick (flush, stop, the agent's own event) rang: end the window now
        self._recent, self._drained_at = 0.0, time.monotonic()  # events/s of the last drain's window
        #: monotonic time since which the events not yet announced may have waited (None: none waiting);
        #: ``on_ingested`` reads it (``batch_since``) so the sinks' linger counts from there.
        self._since: float | None = None
        self.batch_since: float | None = None
        self._stop = threading.Event()
        self._token: object = None

    def kick(self, *, rescan: bool = False) -> None:
        """Drain soon, whatever the rings' sleeping words say; ``rescan``: look for new rings first. Also
        after an append from elsewhere (the agent's own events), so that the group commit covers it.
        Thread-safe."""
        if rescan:
            self._rescan = True
        self._kicked = True
        self.doorbell.ring()

    async def run(self) -> None:
        """The loop's thread, for as long as the calling task runs (cancel it to stop)."""
        self._token = anyio.lowlevel.current_token()
        self._stop.clear()
        await run_owned_thread(self._thread, self._stop_thread)

    def _stop_thread(self) -> None:
        self._stop.set()
        self.kick()

    def _thread(self) -> None:
        while not self._stop.is_set():
            try:
                self._pump()
            except (WALError, OSError) as exc:
                # Disk full, most likely. The rings keep every event (read cursors were not advanced):
                # keep the agent up, say so, and try again.
                self.error = f"cannot append to the WAL in {self.wal_dir}: {exc}"
                log.error("%s; events wait in the rings and spill files; retrying in 1 s (free disk space)",
                          self.error)
                self._stop.wait(1.0)

    def _maybe_notify(self, *, force: bool = False) -> None:
        """Run on_ingested if events are unannounced and the last call is NOTIFY_SECONDS old (``force``:
        whatever its age: the end of a window)."""
        if not self._unnotified:
            return
        now = time.monotonic()
        if now < self._notified + NOTIFY_SECONDS and not force:
            return
        self._unnotified = False
        self._notified = now
        self.batch_since, self._since = self._since, None
        self._notify()

    def _notify(self) -> None:
        if self.on_ingested_threadsafe:
            self.on_ingested()
            return
        try:
            anyio.from_thread.run_sync(self.on_ingested, token=self._token)  # type: ignore[arg-type]
        except anyio.RunFinishedError:
            pass  # the agent is stopping; its final drain wakes nobody

    def _pump(self) -> None:
        ing = self.ingestor
        last_scan = -self.scan_every
        t0, n0 = time.monotonic(), ing.events_total
        while not self._stop.is_set():
            now = time.monotonic()
            if self._rescan or now - last_scan >= self.scan_every:
                # New rings; and the full pass retires idle rings of finished producers.
                self._rescan = False
                ing.scan()
                n = ing.drain()
                last_scan = now
            elif ing.has_pending():
                n = ing.drain()
            else:
                n = 0
            if now - t0 >= 1.0:
                self.rate = (ing.events_total - n0) / (now - t0)
                t0, n0 = now, ing.events_total
            # The rate of the window just drained: a stream that starts is seen as one at its first window.
            self._recent, self._drained_at = n / max(now - self._drained_at, 1e-3), now
            if n:
                self.error = ""
                self._unnotified = True
            if n >= FLOOD_EVENTS:  # drain again at once; commit and announce on their timers
                self._group_commit()
                self._maybe_notify()
                continue
            # The window's end: what it gathered becomes durable and goes to the sinks in one go.
            self._group_commit(force=True)
            self._maybe_notify(force=True)
            # Events in this window, and more than a lone one after a long sleep: a stream. Look again after
            # the next window, awake (producers do not ring while the sleeping word is clear).
            if n > 1 or (n == 1 and self._slept < self.linger):
                self._slept = 0.0
                self._window(time.monotonic())
                continue
            if self._sleep(last_scan + self.scan_every - time.monotonic()):
                self._window(time.monotonic())  # a producer rang: gather for one window, then drain

    def _window(self, since: float) -> None:
        """Wait out one batching window (a kick ends it at once) before the next drain: ``linger``, or at a
        high rate STREAM_SECONDS, with ``since`` moved back by a linger (the sinks then deliver at once)."""
        fast = max(self.rate, self._recent) >= STREAM_RATE and self.linger > STREAM_SECONDS
        if fast:
            since -= self.linger
        if self._since is None or since < self._since:
            self._since = since
        if not self._kicked and self.doorbell.wait(STREAM_SECONDS if fast else self.linger):
            self.doorbell.clear()
        self._kicked = False

    def _group_commit(self, *, force: bool = False) -> None:
        """fsync the WAL if it holds appends and the last fsync is ``fsync_every`` old (``force``: the end of
        a window, whatever its age)."""
        if self.fsync_every is None or not self.wal.dirty:
            return
        now = time.monotonic()
        if now < self._synced + self.fsync_every and not force:
            return
        self.wal.sync()
        self._synced = now

    def _sleep(self, timeout: float) -> bool:
        """Set the sleeping words, look once more (a frame published before its producer could see the word
        would otherwise wait for the scan), then wait for the doorbell or the next scan. True: a producer
        rang (not a kick, which wants its drain now)."""
        ing = self.ingestor
        ing.set_sleeping(True)
        rung = False
        try:
            # has_pending takes the ring table's lock: a locked instruction, so the stores above are visible
            # before the write words are read again.
            if ing.has_pending():
                self._slept = 0.0
                return False
            t0 = time.monotonic()
            rung = self.doorbell.wait(timeout)
            self._slept = time.monotonic() - t0
            self.wakeups += rung
        finally:
            ing.set_sleeping(False)
            if rung:
                self.doorbell.clear()  # a ring that came after a timeout is read on the next wake-up
        kicked, self._kicked = self._kicked, False
        return rung and not kicked
