"""The sink runner: one per sink. Reads the WAL from the sink's cursor, batches, delivers with retries and a
circuit breaker, and commits the cursor only after the backend acknowledged."""
from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from flightlog.proto.codec import decode_event
from flightlog.proto.errors import PermanentBackendError, ProtocolError, RetryableBackendError
from flightlog.proto.events import Event, RunStart

from .retry import CircuitBreaker, RetryPolicy
from .sinks.base import Ack, Batch, Sink, SinkCursor

__all__ = ["SinkRunner", "CursorStore", "decode_batch"]

log = logging.getLogger("flightlog.agent")


class CursorStore:
    """Cursors of sinks that do not store their own, in the agent's SQLite database."""

    def __init__(self, store_path: Any) -> None:
        from flightlog.agent.store import Store

        self._path = store_path
        self._store_cls = Store

    def _open(self) -> Any:
        return self._store_cls(self._path)

    def load(self, sink: str) -> tuple[SinkCursor, set[str]]:
        s = self._open()
        try:
            saved = s.load_cursor(sink)
            return (SinkCursor(*saved) if saved else SinkCursor()), s.sink_runs(sink)
        finally:
            s.close()

    def save(self, sink: str, cursor: SinkCursor, new_runs: set[str]) -> None:
        s = self._open()
        try:
            with s.transaction():
                if new_runs:
                    s.add_sink_runs(sink, new_runs)
                s.save_cursor(sink, cursor.segment, cursor.offset, cursor.seq)
        finally:
            s.close()


def decode_batch(items: list[tuple[int, Any]], on_bad: Callable[[int, ProtocolError], None]) -> list[tuple[int, Event]]:
    out: list[tuple[int, Event]] = []
    for seq, payload in items:
        try:
            out.append((seq, decode_event(payload)))
        except ProtocolError as exc:
            on_bad(seq, exc)
    return out


@dataclass
class SinkStats:
    state: str = "starting"  # ok | retrying | open circuit | parked | starting
    delivered: int = 0
    last_error: str = ""
    rate: float = 0.0
    cursor: SinkCursor = SinkCursor()
    undecodable: int = 0


class SinkRunner:
    def __init__(
        self,
        sink: Sink,
        reader: Any,
        cursors: CursorStore,
        *,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        rng: random.Random | None = None,
        idle_sleep: float = 0.5,  # new data wakes the runner at once (wake()); this is only a safety net
    ) -> None:
        self.sink = sink
        self.reader = reader
        self.cursors = cursors
        self.policy = policy or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self.rng = rng or random.Random()
        self.idle_sleep = idle_sleep
        self.stats = SinkStats()
        self.runs: set[str] = set()
        self.caught_up = False
        self._wake = anyio.Event()

    def wake(self) -> None:
        """New data in the WAL: stop idling."""
        self._wake.set()

    async def run(self) -> None:
        sink = self.sink
        own = await anyio.to_thread.run_sync(sink.open)
        cursor, self.runs = await anyio.to_thread.run_sync(self.cursors.load, sink.name)
        if own is not None:
            cursor = own
        self.stats.cursor = cursor
        self.stats.state = "ok"
        t0, n0 = time.monotonic(), 0
        try:
            while True:
                items, nxt = await anyio.to_thread.run_sync(
                    lambda: self.reader.read(cursor, max_events=sink.batch_size)
                )
                if not items:
                    self.caught_up = True
                    with anyio.move_on_after(self.idle_sleep):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                self.caught_up = False
                events = decode_batch(items, self._undecodable)
                new_runs = {ev.run_id for _, ev in events if type(ev) is RunStart and sink.name in ev.sinks}
                if not sink.all_runs:
                    self.runs |= new_runs
                    events = [(s, ev) for s, ev in events if ev.run_id in self.runs]
                committed = False
                if events:
                    ack = await self._deliver(Batch(events, nxt, {ev.run_id for _, ev in events}))
                    if ack is None:
                        return  # parked: the cursor stays before the batch the backend refused
                    committed = ack.cursor_committed
                if not committed or new_runs:
                    await self._save_cursor(nxt, new_runs)
                cursor = nxt
                self.stats.cursor = cursor
                self.stats.delivered += len(events)
                now = time.monotonic()
                if now - t0 >= 1.0:
                    self.stats.rate = (self.stats.delivered - n0) / (now - t0)
                    t0, n0 = now, self.stats.delivered
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sink.close)

    async def _deliver(self, batch: Batch) -> Ack | None:
        attempt = 0
        while True:
            wait = self.breaker.wait_time() if not self.breaker.allow() else 0.0
            if wait:
                self.stats.state = "open circuit"
                await anyio.sleep(wait)
            try:
                ack = await anyio.to_thread.run_sync(self.sink.write, batch)
            except RetryableBackendError as exc:
                attempt += 1
                await self._backoff(attempt, str(exc), exc.retry_after)
                continue
            except PermanentBackendError as exc:
                self.stats.state = "parked"
                self.stats.last_error = str(exc)
                log.error("sink %s parked at seq %d: %s", self.sink.name, batch.events[0][0], exc)
                return None
            except Exception as exc:  # an unclassified library error: retry, never crash the agent
                attempt += 1
                log.debug("sink %s: unexpected error", self.sink.name, exc_info=True)
                await self._backoff(attempt, f"{type(exc).__name__}: {exc}", None)
                continue
            self.breaker.record_success()
            self.stats.state = "ok"
            return ack

    async def _save_cursor(self, cursor: SinkCursor, new_runs: set[str]) -> None:
        """Commit the cursor; a failure (disk full) is retried: re-delivering is what must not happen."""
        attempt = 0
        while True:
            try:
                await anyio.to_thread.run_sync(self.cursors.save, self.sink.name, cursor, new_runs)
            except (sqlite3.Error, OSError) as exc:
                attempt += 1
                await self._backoff(attempt, f"cannot store the cursor: {exc}", None)
                continue
            self.stats.state = "ok"
            return

    async def _backoff(self, attempt: int, error: str, retry_after: float | None) -> None:
        self.breaker.record_failure()
        self.stats.state = "retrying"
        self.stats.last_error = error
        delay = self.policy.delay(attempt, self.rng, retry_after)
        log.warning("sink %s: %s; retry %d in %.2f s", self.sink.name, error, attempt, delay)
        await anyio.sleep(delay)

    def _undecodable(self, seq: int, exc: ProtocolError) -> None:
        self.stats.undecodable += 1
        log.error("sink %s: event seq %d cannot be decoded and is skipped: %s", self.sink.name, seq, exc)
