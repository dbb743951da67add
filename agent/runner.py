"""The delivery engine's I/O shell: one ``SinkRunner`` per sink runs the sans-IO ``DeliveryCore``
(``engine.py``) on anyio, for live sinks and for ``wal replay`` alike. A shared ``WalFeed`` decodes each WAL
read once for every runner; ``CursorStore`` keeps cursors, sink runs and quarantine records through one
long-lived SQLite connection."""
from __future__ import annotations

import logging
import math
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flightlog.proto.codec import decode_event
from flightlog.proto.config import AgentConfig
from flightlog.proto.errors import FlightlogError, ProtocolError, RetryableBackendError
from flightlog.proto.events import Event

from .engine import (
    Commit,
    Deliver,
    DeliveryCore,
    GiveUp,
    Persist,
    Quarantined,
    Read,
    SinkStats,
    Wait,
    Window,
)
from .owned_thread import run_owned_thread
from .quarantine import QuarantineBox
from .retry import CircuitBreaker, RetryPolicy
from .sinks.base import Sink, SinkCursor
from .wal import WALReader

__all__ = ["CursorStore", "SinkRunner", "SinkStats", "WalFeed", "decode_batch", "linger_seconds"]

log = logging.getLogger("flightlog.agent")

_NEVER = 1 << 62
#: A sink that passes over events is woken to catch up once it lags this many behind and the feed's cache
#: is about to drop them (at a trickle, never: its safety poll comes first).
CATCH_UP_EVENTS = 2000


def linger_seconds(settings: Mapping[str, Any] | None) -> float:
    """``agent.linger_ms`` of the agent's config dict (default: AgentConfig's), in seconds."""
    agent = (settings or {}).get("agent") or {}
    ms = agent.get("linger_ms")
    return (AgentConfig().linger_ms if ms is None else float(ms)) / 1000.0


def decode_batch(items: Iterable[tuple[int, Any]], on_bad: Callable[[int, ProtocolError], None]) -> list[tuple[int, Event]]:
    out: list[tuple[int, Event]] = []
    for seq, payload in items:
        try:
            out.append((seq, decode_event(payload)))
        except ProtocolError as exc:
            on_bad(seq, exc)
    return out


class WalFeed:
    """One WAL reader and the last few decoded windows, shared by the runners: a read that another runner
    already made is served from memory, so each event is decoded once, not once per sink. Thread-safe."""

    def __init__(self, reader: WALReader, *, window_events: int = 2000, keep: int = 16) -> None:
        self.reader = reader
        self.window_events = window_events
        self._keep = keep
        self._windows: OrderedDict[int, Window] = OrderedDict()  # by start seq, most recently used last
        self._lock = threading.Lock()
        self.decoded = 0  # events decoded (a test and `status` can see the sharing work)
        self.reads = 0
        #: The first seq of the newest half of the cache (-1: the cache is not that full): a runner that
        #: passes over events and lags below it catches up now (``SinkRunner.wake``), from memory.
        self.horizon = -1

    def read(self, cursor: SinkCursor) -> Window | None:
        seq = cursor.seq
        with self._lock:
            for key, w in reversed(self._windows.items()):
                if w.contains(seq):
                    self._windows.move_to_end(key)
                    return self._joined(key, w)
            items, end = self.reader.read(cursor, max_events=self.window_events)
            self.reads += 1
            if not items:
                return Window(cursor, [], end) if end != cursor else None
            bad: list[int] = []
            events = decode_batch(items, lambda s, exc: self._bad(bad, s, exc))
            self.decoded += len(items)
            w = Window.of(cursor, events, end, tuple(bad))
            self._windows[seq] = w
            while len(self._windows) > self._keep:
                self._windows.popitem(last=False)
            self._moved()
            return w

    def _moved(self) -> None:
        """The cache changed: a cursor below the newest half of it is at risk of re-reading (and decoding
        again) what the cache is about to drop."""
        if len(self._windows) < self._keep // 2:
            self.horizon = -1
            return
        self.horizon = sorted(self._windows)[-(self._keep // 2)]

    def _joined(self, key: int, w: Window) -> Window:
        """``w`` and the cached windows that follow it, as one (up to ``window_events``): a runner behind the
        one that read them (a sink the new events are not for, looking once a second) then catches up in one
        read, not one per WAL record the ingest loop wrote meanwhile."""
        parts, n = [w], len(w.events)
        while n < self.window_events and (nxt := self._windows.get(parts[-1].end.seq)) is not None \
                and nxt is not parts[-1]:
            parts.append(nxt)
            n += len(nxt.events)
        if len(parts) == 1:
            return w
        joined = Window.joined(parts)
        for p in parts[1:]:
            self._windows.pop(p.start.seq, None)
        self._windows[key] = joined
        self._windows.move_to_end(key)
        self._moved()
        return joined

    @staticmethod
    def _bad(bad: list[int], seq: int, exc: ProtocolError) -> None:
        bad.append(seq)
        log.error("WAL event seq %d cannot be decoded and is skipped by every sink: %s", seq, exc)

    def backlog(self, cursor: SinkCursor) -> tuple[int, int]:
        with self._lock:
            return self.reader.backlog(cursor)

    def close(self) -> None:
        with self._lock:
            self._windows.clear()
            self.reader.close()


class CursorStore:
    """The sinks' cursors, run lists and quarantine records in the agent's SQLite store, through one
    long-lived connection (runners call from worker threads, one at a time under a lock)."""

    def __init__(self, store_path: str | Path) -> None:
        self.path = Path(store_path)
        self._store: Any = None
        self._lock = threading.Lock()

    def _db(self) -> Any:
        if self._store is None:
            from flightlog.agent.store import Store

            self._store = Store(self.path)
        return self._store

    def load(self, sink: str) -> tuple[SinkCursor, set[str]]:
        with self._lock:
            s = self._db()
            saved = s.load_cursor(sink)
            return (SinkCursor(*saved) if saved else SinkCursor()), s.sink_runs(sink)

    def save(self, sink: str, cursor: SinkCursor, new_runs: Iterable[str] = ()) -> None:
        with self._lock:
            s = self._db()
            with s.transaction():
                runs = list(new_runs)
                if runs:
                    s.add_sink_runs(sink, runs)
                s.save_cursor(sink, cursor.segment, cursor.offset, cursor.seq)

    def quarantined_runs(self, sink: str) -> set[str]:
        with self._lock:
            return self._db().quarantined_runs(sink)  # type: ignore[no-any-return]

    def record_quarantine(self, records: list[Quarantined], where: str) -> None:
        with self._lock:
            s = self._db()
            with s.transaction():
                for r in records:
                    seqs = [seq for seq, _ in r.events if seq >= 0]
                    if r.first:
                        s.add_quarantine(r.sink, r.run_id, r.scope, seqs[0] if seqs else -1, len(seqs), r.reason,
                                         where)
                    else:
                        s.more_quarantined(r.sink, r.run_id, len(seqs))

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class SinkRunner:
    """Runs one sink: reads through the feed, batches by size and linger time, delivers with retries and a
    circuit breaker, quarantines what the backend refuses for good, and commits the cursor after each ack.

    The I/O shell is one thread per sink (owned by the calling task, like the ingest loop's): a wake-up is a
    condition variable, and reading, writing and committing are plain calls in that thread, not hops between
    the event loop and the thread pool (three per batch and sink, most of the agent's cost at a trickle)."""

    def __init__(
        self,
        sink: Sink,
        feed: WalFeed | WALReader,
        cursors: CursorStore,
        *,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        rng: random.Random | None = None,
        linger: float = AgentConfig().linger_ms / 1000.0,
        idle_sleep: float = 0.5,  # new data wakes the runner (wake()); this is only a safety net
        tail: Callable[[], int] | None = None,  # the WAL's next seq (a live WAL); None: poll the reader
        quarantine: QuarantineBox | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_attempts: int = 0,
        until_caught_up: bool = False,  # return once everything is delivered (replay)
        on_commit: Callable[[SinkCursor], None] | None = None,
        only_runs: Iterable[str] | None = None,
    ) -> None:
        self.sink = sink
        self.feed = feed if isinstance(feed, WalFeed) else WalFeed(feed)
        self.cursors = cursors
        self.policy = policy or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(clock=clock)
        self.rng = rng or random.Random()
        self.linger = linger
        self.idle_sleep = idle_sleep
        self.quarantine = quarantine or QuarantineBox(cursors.path.parent / "quarantine")
        self.clock = clock
        self.max_attempts = max_attempts
        self.until_caught_up = until_caught_up
        self.on_commit = on_commit
        self.only_runs = frozenset(only_runs) if only_runs is not None else None
        self.core: DeliveryCore | None = None
        self._stats = SinkStats()
        self._tail = tail
        self._armed = _NEVER
        self._cond = threading.Condition(threading.Lock())
        self._woken = False
        self._since: float | None = None  # when the oldest event announced by wake() may have arrived
        self._passed = 0  # the WAL's next seq when wake() last found the new events of no run of this sink
        self._stop = threading.Event()
        self._rate_t0, self._rate_n0 = 0.0, 0

    @property
    def stats(self) -> SinkStats:
        return self.core.stats if self.core is not None else self._stats

    @property
    def caught_up(self) -> bool:
        return self.core is not None and self.core.caught_up()

    # --- waking (thread-safe) -----------------------------------------------------------------------

    def wake(self, next_seq: int | None = None, runs: set[str] | None = None, since: float | None = None) -> None:
        """New events in the WAL (``next_seq``: the WAL's next seq, if known; ``runs``: the runs they belong
        to, if known; ``since``: the ``clock`` time from which the oldest of them may have waited, so the
        linger counts from there). Callable from any thread; a no-op unless the runner waits for this much data (so a
        trickle does not wake it per event) and the events may be for its sink (another sink's runs do not
        wake it: it passes over them on its next look)."""
        if since is not None and (self._since is None or since < self._since):
            self._since = since  # kept even when not woken: the linger that runs anyway counts from it
        if next_seq is not None and next_seq < self._armed:
            return
        core = self.core
        if runs is not None and core is not None and not core.wants_any(runs):
            if next_seq is not None and next_seq > self._passed:
                self._passed = next_seq  # what reached the WAL so far is not for this sink: no need to look
            behind = core.read_cursor.seq
            if behind >= self.feed.horizon or (next_seq or 0) - behind < CATCH_UP_EVENTS:
                return
            # Far behind, and the shared cache is about to drop what it passes over: look now, from memory
            # (at 10,000 events/s, sinks that looked every few seconds decoded the WAL again each).
        with self._cond:
            self._woken = True
            self._cond.notify()

    def _wait(self, core: DeliveryCore, until: float | None) -> None:
        self._armed = core.wants_wake_at()
        try:
            timeout = self.idle_sleep if until is None else until - self.clock()
            tail = self._tail() if self._tail is not None else None
            if tail is not None and tail >= self._armed and tail > self._passed:
                timeout = 0.0  # data came between the decision and the arming (and wake() did not pass it)
            if timeout > 0:
                with self._cond:
                    if not self._woken:
                        self._cond.wait(timeout)
                    self._woken = False
        finally:
            self._armed = _NEVER
        since, self._since = self._since, None
        core.on_tail(self._tail() if self._tail is not None else math.inf, since)

    def _pause(self, seconds: float) -> bool:
        """Sleep for a retry; False if the runner is being stopped."""
        return not self._stop.wait(seconds)

    # --- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """The sink's thread, for as long as the calling task runs (cancel it to stop); raises what stopped
        the sink (``wal replay``: a batch that kept failing)."""
        self._stop.clear()
        error = await run_owned_thread(self._thread, self._stop_thread)
        if error is not None:
            raise error

    def _stop_thread(self) -> None:
        self._stop.set()
        self.wake()

    def _thread(self) -> Exception | None:
        sink = self.sink
        try:
            own = sink.open()
            cursor, runs = self.cursors.load(sink.name)
            quarantined = self.cursors.quarantined_runs(sink.name)
            core = DeliveryCore(
                sink.name, sink.batch_size, sink.all_runs, cursor=own if own is not None else cursor, runs=runs,
                quarantined_runs=quarantined, linger=self.linger, policy=self.policy, breaker=self.breaker,
                rng=self.rng, scope=getattr(sink, "quarantine_scope", "event"), max_attempts=self.max_attempts,
                flushing=self.until_caught_up, run_start=getattr(sink, "run_start", lambda run_id: None),
                only_runs=self.only_runs,
            )
            core.on_tail(self._tail() if self._tail is not None else math.inf)
            core.stats.state = "ok"
            self.core = core
            self._rate_t0 = self.clock()
            self._loop_core(core)
            return None
        except Exception as exc:  # handed to the owning task, which raises it
            return exc
        finally:
            sink.close()
            self.quarantine.close_sink(sink.name)

    def _loop_core(self, core: DeliveryCore) -> None:
        while not self._stop.is_set():
            act = core.step(self.clock())
            if type(act) is Read:
                core.on_read(self.feed.read(act.cursor), self.clock())
            elif type(act) is Deliver:
                self._deliver(core, act)
            elif type(act) is Commit:
                self._commit(core, act)
            elif type(act) is Persist:
                self._persist(core, act)
            elif type(act) is GiveUp:
                raise RetryableBackendError(f"sink {self.sink.name}: {act.error}; run again to resume at seq "
                                            f"{core.cursor.seq}")
            elif type(act) is Wait:
                if self.until_caught_up and core.caught_up():
                    return
                self._wait(core, act.until)

    def _deliver(self, core: DeliveryCore, act: Deliver) -> None:
        try:
            ack = self.sink.write(act.batch)
        except Exception as exc:  # classified by the core: permanent, retryable, or unknown (capped retries)
            text, trace = core.on_error(exc, self.clock())
            level = logging.INFO if core.urgent and core.inflight is not None else logging.WARNING
            log.log(level, "sink %s: %s", self.sink.name, text, exc_info=exc if trace else None)
            return
        core.on_ack(ack, self.clock())
        if ack.cursor_committed and self.on_commit is not None:
            self.on_commit(act.batch.cursor)
        self._update_rate(core)

    def _commit(self, core: DeliveryCore, act: Commit) -> None:
        """Store the cursor; a failure (disk full) is retried: re-delivering is what must not happen."""
        attempt = 0
        while True:
            try:
                self.cursors.save(self.sink.name, act.cursor, act.new_runs)
            except (sqlite3.Error, OSError, FlightlogError) as exc:
                attempt += 1
                if not self._store_backoff(core, attempt, f"cannot store the cursor: {exc}"):
                    return
                continue
            core.on_committed(act.cursor, act.new_runs, self.clock())
            if self.on_commit is not None:
                self.on_commit(act.cursor)
            return

    def _persist(self, core: DeliveryCore, act: Persist) -> None:
        """Quarantined events into ``<data_dir>/quarantine/<sink>`` (a WAL) and their rows in the store."""
        attempt = 0
        while True:
            try:
                where = self.quarantine.put(self.sink.name, act.records)
                self.cursors.record_quarantine(act.records, str(where))
            except (sqlite3.Error, OSError, FlightlogError) as exc:  # disk full; a WALError of the quarantine
                attempt += 1
                if not self._store_backoff(core, attempt, f"cannot store quarantined events: {exc}"):
                    return
                continue
            for r in act.records:
                if r.first:
                    log.error("sink %s: %s of run %s quarantined: %s; every other run keeps flowing "
                              "(`flightlog wal replay %s` after a fix)", self.sink.name,
                              "the run" if r.scope == "run" else f"event seq {r.events[-1][0]}", r.run_id,
                              r.reason, self.quarantine.directory(self.sink.name))
            core.on_persisted()
            return

    def _store_backoff(self, core: DeliveryCore, attempt: int, error: str) -> bool:
        core.stats.state = "retrying"
        core.stats.last_error = error
        delay = self.policy.delay(attempt, self.rng)
        log.warning("sink %s: %s; retry %d in %.2f s", self.sink.name, error, attempt, delay)
        return self._pause(delay)

    def _update_rate(self, core: DeliveryCore) -> None:
        now = self.clock()
        if now - self._rate_t0 >= 1.0:
            core.stats.rate = (core.stats.delivered - self._rate_n0) / (now - self._rate_t0)
            self._rate_t0, self._rate_n0 = now, core.stats.delivered
