"""The delivery engine's sans-IO core: which events a sink gets, when a batch goes out (full, or its linger
time passed), what a backend error means (retry with backoff, or quarantine the event or the run) and which
cursor to commit. Time comes in as numbers from an injected clock; ``runner.py`` does the I/O for live sinks
and for ``wal replay`` alike."""
from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from flightlog.agent.wal.format import WalCursor
from flightlog.proto.errors import PermanentBackendError, RetryableBackendError
from flightlog.proto.events import Event, RunStart

from .retry import CircuitBreaker, RetryPolicy
from .run_counts import count_delivered
from .sinks.base import Ack, Batch

__all__ = [
    "Action",
    "Commit",
    "Deliver",
    "DeliveryCore",
    "GiveUp",
    "Persist",
    "Quarantined",
    "Read",
    "Scope",
    "SinkStats",
    "Wait",
    "Window",
]

Scope = Literal["event", "run"]
Item = tuple[int, Event]


@dataclass(frozen=True, slots=True)
class Window:
    """The decoded events of one WAL read, shared by every runner whose cursor falls inside it."""

    start: WalCursor
    events: list[Item]
    end: WalCursor
    undecodable: tuple[int, ...] = ()
    #: The runs of its events, and whether a RunStart is among them (``of`` finds both): a sink that serves
    #: none of these runs passes over the window at once, not event by event. None: not known, look at each.
    runs: frozenset[str] | None = None
    starts: bool = True

    @classmethod
    def of(cls, start: WalCursor, events: list[Item], end: WalCursor, undecodable: tuple[int, ...] = ()) -> Window:
        return cls(start, events, end, undecodable, frozenset(ev.run_id for _, ev in events),
                   any(type(ev) is RunStart for _, ev in events))

    @classmethod
    def joined(cls, parts: list[Window]) -> Window:
        """Consecutive windows as one (their runs known only if every part's is)."""
        known = [p.runs for p in parts if p.runs is not None]
        return cls(parts[0].start, [item for p in parts for item in p.events], parts[-1].end,
                   tuple(s for p in parts for s in p.undecodable),
                   frozenset().union(*known) if len(known) == len(parts) else None, any(p.starts for p in parts))

    def contains(self, seq: int) -> bool:
        return self.start.seq <= seq < self.end.seq

    def index(self, seq: int) -> int:
        """Position of the first event whose seq is ``seq`` or later."""
        return bisect.bisect_left(self.events, seq, key=lambda item: item[0])


@dataclass(slots=True)
class Quarantined:
    """Events a sink refused for good: one event (``scope="event"``) or a run's events (``"run"``)."""

    sink: str
    run_id: str
    scope: Scope
    reason: str
    events: list[Item]
    first: bool = True  # the incident itself; False: later events of a run quarantined before


@dataclass
class SinkStats:
    state: str = "starting"  # ok | retrying | open circuit | starting | given up
    delivered: int = 0
    last_error: str = ""
    rate: float = 0.0
    cursor: WalCursor = field(default_factory=WalCursor)  # committed: what WAL retention may rely on
    undecodable: int = 0
    quarantined_events: int = 0
    retries: int = 0
    run_delivered: dict[str, int] = field(default_factory=dict)  # run -> its events delivered (health report)


@dataclass(frozen=True, slots=True)
class Read:
    cursor: WalCursor


@dataclass(frozen=True, slots=True)
class Deliver:
    batch: Batch


@dataclass(frozen=True, slots=True)
class Commit:
    cursor: WalCursor
    new_runs: frozenset[str]


@dataclass(frozen=True, slots=True)
class Persist:
    """Quarantined events to make durable (before any cursor that passes them is committed)."""

    records: list[Quarantined]


@dataclass(frozen=True, slots=True)
class Wait:
    until: float | None  # None: until woken


@dataclass(frozen=True, slots=True)
class GiveUp:
    """``max_attempts`` retries of one batch failed (``wal replay``: stop and say how to resume)."""

    error: str


Action = Read | Deliver | Commit | Persist | Wait | GiveUp


@dataclass
class DeliveryCore:
    """One sink's delivery state machine. Call ``step(now)`` for the next action and report its outcome with
    ``on_read``, ``on_ack``, ``on_error``, ``on_committed`` or ``on_persisted``."""

    name: str
    batch_size: int
    all_runs: bool
    cursor: WalCursor = field(default_factory=WalCursor)
    runs: set[str] = field(default_factory=set)
    quarantined_runs: set[str] = field(default_factory=set)
    linger: float = 0.15
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    rng: random.Random = field(default_factory=random.Random)
    scope: Scope = "event"  # what one refused event takes down on this sink: itself, or its run
    commit_interval: float = 1.0  # cursor-only advances (nothing of ours in between) commit at most this often
    max_attempts: int = 0  # 0: retry for ever (live sinks); replay gives up and can be resumed
    flushing: bool = False  # no lingering: every event is already there (replay)
    run_start: Callable[[str], RunStart | None] = lambda run_id: None  # a run's RunStart from the sink's registry
    only_runs: frozenset[str] | None = None  # replay --run: these runs only

    def __post_init__(self) -> None:
        self.read_cursor = self.cursor  # next read starts here
        self.done = self.cursor  # everything before it is delivered, filtered out or quarantined
        self.tail = math.inf  # first seq not yet in the WAL, as far as we know (inf: unknown, read to see)
        self.pending: list[Item] = []
        self.data_since: float | None = None
        self.since: float | None = None  # from on_tail: when the events not yet read may have arrived
        self.new_runs: set[str] = set()
        self.inflight: Batch | None = None
        self.attempt = 0
        self.retry_at = 0.0
        self.last_commit = -math.inf
        self.commit_now = False
        self.urgent = False  # deliver what is pending now (the rest of a split batch)
        self.outbox: list[Quarantined] = []
        self.starts: dict[str, RunStart] = {}
        self.ignored: set[str] = set()  # runs seen that this sink does not serve (see wanted_any)
        self.stats = SinkStats(cursor=self.cursor)
        self._seen_unknown: set[str] = set()

    # --- deciding -----------------------------------------------------------------------------------

    def step(self, now: float) -> Action:
        if self.outbox:
            return Persist(self.outbox)
        if self.inflight is not None:
            if self.gave_up():
                return GiveUp(self.stats.last_error)
            if now < self.retry_at:
                return Wait(self.retry_at)
            if not self.breaker.allow():
                self.stats.state = "open circuit"
                return Wait(now + self.breaker.wait_time())
            return Deliver(self.inflight)
        if self.commit_now and (self.done != self.cursor or self.new_runs):
            return Commit(self.done, frozenset(self.new_runs))  # acked: make it durable before going on
        if self.pending and (self.urgent or len(self.pending) >= self.batch_size):
            return self._take()
        if self.tail > self.read_cursor.seq:
            if self.data_since is None:
                if not self.all_runs:
                    # Nothing of ours pending: look at once. What this sink does not want (another sink's
                    # runs) then costs one cheap read, not a linger; what it wants starts the linger (on_read).
                    return Read(self.read_cursor)
                self.data_since = self._linger_start(now)  # every event is this sink's: linger, then one read
            full = self.tail - self.read_cursor.seq + len(self.pending) >= self.batch_size
            if self.flushing or full or now >= self.data_since + self.linger:
                return Read(self.read_cursor)
            return Wait(self.data_since + self.linger)
        if self.pending:
            if self.flushing or self.data_since is None or now >= self.data_since + self.linger:
                return self._take()
            return Wait(self.data_since + self.linger)  # a trickle: let more of it join the batch
        if self.done != self.cursor or self.new_runs:
            due = self.last_commit + self.commit_interval
            if self.commit_now or self.new_runs or self.flushing or now >= due:
                return Commit(self.done, frozenset(self.new_runs))
            return Wait(due)
        return Wait(None)

    def _take(self) -> Deliver:
        n = min(len(self.pending), self.batch_size)
        events, rest = self.pending[:n], self.pending[n:]
        # A batch ending inside a read: resume at the next event's seq from the committed record (the reader
        # skips what lies before that seq).
        end = self.read_cursor if not rest else WalCursor(self.cursor.segment, self.cursor.offset, rest[0][0])
        self.pending = rest
        if not rest:
            self.data_since = None
            self.urgent = False
        self.inflight = Batch(events, end, {ev.run_id for _, ev in events})
        self.attempt = 0
        self.retry_at = 0.0
        return Deliver(self.inflight)

    def wants_any(self, run_ids: Iterable[str]) -> bool:
        """Whether new events of these runs may be for this sink: a run it serves, or one it has not seen
        (its RunStart may name this sink). A run that starts again naming this sink after it was seen
        without it waits for the runner's next look (the safety poll): it is never missed."""
        if self.all_runs:
            return True
        runs, ignored = self.runs, self.ignored
        return any(rid in runs or rid not in ignored for rid in run_ids)

    def wants_wake_at(self) -> int:
        """The WAL's next seq from which a wake-up is worth it: any new event when idle; a full batch when the
        linger timer runs anyway (never a wake-up per event)."""
        if self.inflight is not None:
            return 1 << 62
        if self.data_since is None:
            return self.read_cursor.seq + 1
        return self.read_cursor.seq + max(1, self.batch_size - len(self.pending))

    # --- outcomes -----------------------------------------------------------------------------------

    def on_tail(self, next_seq: float, since: float | None = None) -> None:
        """The WAL holds events up to ``next_seq`` (exclusive); ``math.inf``: unknown, read to find out.
        ``since``: the oldest new event may have waited from then (the ingest loop's batching window), so
        a linger that starts now counts from there: an event waits one window in all, not two."""
        if since is not None and next_seq > self.read_cursor.seq and (self.since is None or since < self.since):
            self.since = since
        self.tail = next_seq

    def on_read(self, window: Window | None, now: float) -> None:
        """A WAL read from ``read_cursor`` came back (None or an empty window: nothing more yet)."""
        seq = self.read_cursor.seq
        if window is None or not window.contains(seq):
            self.tail = seq  # nothing more yet
            self.since = None
            if window is not None and window.end.seq == seq and not self.pending and self.inflight is None:
                self.read_cursor = self.done = window.end  # the reader moved on (segment end): keep that
            return
        room = self.batch_size - len(self.pending)
        events, n = window.events, len(window.events)
        i = n if self._passes_over(window) else window.index(seq)
        end = window.end
        while i < n:
            item = events[i]
            if self._wanted(item):
                if room <= 0:
                    end = WalCursor(self.cursor.segment, self.cursor.offset, item[0])
                    break
                self.pending.append(item)
                room -= 1
            i += 1
        stop = end.seq
        self.stats.undecodable += sum(1 for s in window.undecodable if seq <= s < stop)
        self.read_cursor = end
        if not self.pending and self.inflight is None:
            self.done = end
            self.data_since = None
        elif self.pending and self.data_since is None:
            self.data_since = self._linger_start(now)  # the first event this sink wants: its linger starts
        if self.read_cursor.seq >= self.tail:
            self.since = None  # read up to the tail: what comes next arrives later

    def _passes_over(self, window: Window) -> bool:
        """Whether no event of ``window`` can be this sink's, as ``_wanted`` would find event by event: no run
        in it is one the sink serves (or a replay takes), and no RunStart is among them (one may name it)."""
        runs = window.runs
        if self.all_runs or runs is None or window.starts:
            return False
        only = self.only_runs
        if any(rid in self.runs and (only is None or rid in only) for rid in runs):
            return False
        self.ignored.update(rid for rid in runs if only is None or rid in only)
        return True

    def _linger_start(self, now: float) -> float:
        return now if self.since is None else min(now, self.since)

    def _wanted(self, item: Item) -> bool:
        ev = item[1]
        rid = ev.run_id
        if self.only_runs is not None and rid not in self.only_runs:
            return False
        if type(ev) is RunStart:
            self.starts[rid] = ev
            if not self.all_runs and self.name in ev.sinks and rid not in self.runs:
                self.runs.add(rid)
                self.new_runs.add(rid)
        if not self.all_runs and rid not in self.runs:
            self.ignored.add(rid)
            return False
        if rid in self.quarantined_runs:
            self._quarantine_later(rid, item)
            return False
        return True

    def _quarantine_later(self, run_id: str, item: Item) -> None:
        last = self.outbox[-1] if self.outbox else None
        if last is not None and last.run_id == run_id and last.scope == "run" and not last.first:
            last.events.append(item)
        else:
            self.outbox.append(Quarantined(self.name, run_id, "run", "the run is quarantined on this sink",
                                           [item], first=False))
        self.stats.quarantined_events += 1

    def on_ack(self, ack: Ack, now: float) -> None:
        batch = self.inflight
        assert batch is not None, "on_ack without a delivery"
        self.inflight = None
        self.attempt = 0
        self.breaker.record_success()
        self.stats.state = "ok"
        refused = dict(ack.refused)
        delivered = [it for it in batch.events if it[1].run_id not in refused]
        self.stats.delivered += len(delivered)
        count_delivered(self.stats.run_delivered, delivered, batch.run_ids - refused.keys())
        for run_id, reason in refused.items():
            self.stats.last_error = reason
            self._quarantine(run_id, "run", reason, [it for it in batch.events if it[1].run_id == run_id])
        if ack.cursor_committed and not refused:
            self.cursor = batch.cursor
            self.stats.cursor = batch.cursor
            self.last_commit = now
        else:
            self.commit_now = True
        self.done = batch.cursor

    def on_error(self, exc: BaseException, now: float) -> tuple[str, bool]:
        """A delivery failed. Returns (what to log, whether to log the traceback: once per error type)."""
        batch = self.inflight
        assert batch is not None, "on_error without a delivery"
        if isinstance(exc, PermanentBackendError):
            return self._refused(batch, str(exc)), False
        retry_after = exc.retry_after if isinstance(exc, RetryableBackendError) else None
        if isinstance(exc, RetryableBackendError):
            text = str(exc)
            trace = False
        else:  # unclassified: retryable on the capped schedule, the traceback shown once per type
            kind = type(exc).__name__
            text = f"{kind}: {exc}"
            trace = kind not in self._seen_unknown
            self._seen_unknown.add(kind)
        self.attempt += 1
        self.stats.retries += 1
        self.breaker.record_failure()
        self.stats.state = "retrying"
        self.stats.last_error = text
        delay = self.policy.delay(self.attempt, self.rng, retry_after)
        self.retry_at = now + delay
        if self.max_attempts and self.attempt >= self.max_attempts:
            return f"{text}; giving up after {self.attempt} tries", trace
        return f"{text}; retry {self.attempt} in {delay:.2f} s", trace

    def gave_up(self) -> bool:
        return bool(self.max_attempts) and self.attempt >= self.max_attempts

    def _refused(self, batch: Batch, reason: str) -> str:
        """A permanent error: one event left, quarantine it (or its run); else split the batch to find it."""
        self.stats.last_error = reason
        events = batch.events
        if len(events) == 1:
            seq, ev = events[0]
            self._quarantine(ev.run_id, self.scope, reason, list(events))
            self.inflight = None
            self.commit_now = True
            self.done = batch.cursor
            return f"event seq {seq} of run {ev.run_id} quarantined ({self.scope}): {reason}"
        half = len(events) // 2
        first, rest = events[:half], events[half:]
        # The second half goes back in front of what is pending; the first is re-sent on its own.
        self.pending = rest + self.pending
        self.urgent = True
        cut = WalCursor(self.cursor.segment, self.cursor.offset, rest[0][0])
        self.inflight = Batch(first, cut, {ev.run_id for _, ev in first})
        self.retry_at = 0.0
        return f"batch of {len(events)} refused ({reason}); narrowing it down to the bad event"

    def _quarantine(self, run_id: str, scope: Scope, reason: str, events: list[Item]) -> None:
        if scope == "run" and run_id not in self.quarantined_runs:
            self.quarantined_runs.add(run_id)
            # Later events of the run queued in this sink go with it; its RunStart first, so a replay of the
            # quarantine (after a fix) recreates the run as it was.
            later = [it for it in self.pending if it[1].run_id == run_id]
            self.pending = [it for it in self.pending if it[1].run_id != run_id]
            events = events + later
            start = self.starts.get(run_id) or self.run_start(run_id)
            if start is not None and not any(type(ev) is RunStart for _, ev in events):
                events = [(-1, start), *events]
        self.stats.quarantined_events += sum(1 for s, _ in events if s >= 0)
        self.outbox.append(Quarantined(self.name, run_id, scope, reason, events))

    def on_persisted(self) -> None:
        self.outbox = []

    def on_committed(self, cursor: WalCursor, new_runs: Iterable[str], now: float) -> None:
        self.cursor = cursor
        self.stats.cursor = cursor
        self.new_runs -= set(new_runs)
        self.last_commit = now
        self.commit_now = False
        self.stats.state = "ok" if self.inflight is None else self.stats.state

    def caught_up(self) -> bool:
        """Nothing left to read, deliver, persist or commit."""
        return (self.tail <= self.read_cursor.seq and not self.pending and self.inflight is None
                and not self.outbox and self.done == self.cursor and not self.new_runs)
