"""The sink runner's own logic with an in-memory sink: batching, retries, breaker, parking, cursors."""
from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from flightlog.agent.retry import CircuitBreaker, RetryPolicy
from flightlog.agent.runner import CursorStore, SinkRunner
from flightlog.agent.sinks.base import Batch
from flightlog.agent.sinks.memory import InMemorySink
from flightlog.agent.sinks.store import LocalStoreSink
from flightlog.agent.store import Store
from flightlog.agent.wal import WAL, WalCursor, WALReader
from flightlog.proto import PermanentBackendError, RetryableBackendError, encode_event
from flightlog.proto.codec import decode_event
from flightlog.proto.events import Metrics, RunStart
from flightlog.proto.frames import append_frame

FAST = RetryPolicy(initial=0.001, maximum=0.01)


def fill_wal(wal: WAL, n: int, run_id: str = "r1", sinks: tuple[str, ...] = ("store", "memory")) -> None:
    buf = bytearray()
    append_frame(buf, encode_event(RunStart(run_id, "name", 0.0, sinks=list(sinks))))
    wal.append(buf, 1, "test")
    for start in range(0, n, 100):
        buf = bytearray()
        count = min(100, n - start)
        for i in range(start, start + count):
            append_frame(buf, encode_event(Metrics(run_id, i, float(i), {"x": float(i)})))
        wal.append(buf, count, "test")


async def run_until(runner: SinkRunner, cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run)
        with anyio.fail_after(timeout):
            while not cond():
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


def make(tmp_path: Path, sink, n: int = 1000, **kw):  # type: ignore[no-untyped-def]
    wal = WAL(tmp_path / "wal", segment_bytes=8192)
    fill_wal(wal, n)
    runner = SinkRunner(sink, WALReader(tmp_path / "wal", limit=wal.end_position),
                        CursorStore(tmp_path / "db.sqlite"), policy=FAST, rng=random.Random(0), **kw)
    return wal, runner


def test_delivers_everything_in_batches_and_commits_cursor(tmp_path: Path) -> None:
    sink = InMemorySink(batch_size=64)
    wal, runner = make(tmp_path, sink)
    anyio.run(run_until, runner, lambda: len(sink.events) == 1001)
    assert [seq for seq, _ in sink.events] == list(range(1001))
    assert sink.writes >= 1001 // 64
    cursor, _ = CursorStore(tmp_path / "db.sqlite").load("memory")
    assert cursor.seq == 1001
    # A new runner resumes at the committed cursor: nothing is delivered twice.
    sink2 = InMemorySink(batch_size=64)
    runner2 = SinkRunner(sink2, WALReader(tmp_path / "wal"), CursorStore(tmp_path / "db.sqlite"), policy=FAST)
    fill_wal(wal, 10, run_id="r2")
    anyio.run(run_until, runner2, lambda: len(sink2.events) == 11)
    assert sink2.events[0][0] == 1001
    wal.close()


def test_retryable_errors_are_retried_with_retry_after_and_nothing_lost(tmp_path: Path) -> None:
    failures = {"left": 5}
    seen_retry_after = []

    def flaky(batch: Batch) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RetryableBackendError("503 from backend", retry_after=0.02)

    sink = InMemorySink(batch_size=100, fail=flaky)
    wal, runner = make(tmp_path, sink, n=300, breaker=CircuitBreaker(threshold=3, reset_after=0.05))
    states = []
    orig = runner.policy.delay
    runner.policy = RetryPolicy(initial=0.001, maximum=0.01)

    def spy(attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        seen_retry_after.append(retry_after)
        states.append(runner.breaker.state)
        return orig(attempt, rng, retry_after)

    runner.policy = type("P", (), {"delay": staticmethod(spy)})()  # type: ignore[assignment]
    anyio.run(run_until, runner, lambda: len(sink.events) == 301)
    assert [s for s, _ in sink.events] == list(range(301))
    assert seen_retry_after == [0.02] * 5
    assert states[:3] == ["closed", "closed", "open"]  # the third consecutive failure opened the circuit
    assert runner.stats.state == "ok"
    wal.close()


def test_unexpected_exceptions_do_not_kill_the_runner(tmp_path: Path) -> None:
    calls = {"n": 0}

    def broken(batch: Batch) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise KeyError("library bug")

    sink = InMemorySink(fail=broken)
    wal, runner = make(tmp_path, sink, n=50)
    anyio.run(run_until, runner, lambda: len(sink.events) == 51)
    assert "KeyError" in runner.stats.last_error
    wal.close()


def test_permanent_error_quarantines_only_the_bad_event(tmp_path: Path) -> None:
    """Once a sink stopped at a refused batch for ever (parked); now the bad event alone is set aside."""
    def bad(batch: Batch) -> None:
        if any(seq == 500 for seq, _ in batch.events):
            raise PermanentBackendError("400: param 'lr' too long")

    sink = InMemorySink(batch_size=100, fail=bad)
    wal, runner = make(tmp_path, sink)
    anyio.run(run_until, runner, lambda: runner.caught_up)
    assert runner.stats.last_error == "400: param 'lr' too long"
    assert [seq for seq, _ in sink.events] == [s for s in range(1001) if s != 500]
    cursor, _ = CursorStore(tmp_path / "db.sqlite").load("memory")
    assert cursor.seq == 1001  # past the bad event: a restart does not stop at it again
    rows = Store(tmp_path / "db.sqlite").quarantine_rows()
    assert [(r["sink"], r["run_id"], r["scope"], r["seq"], r["reason"]) for r in rows] == [
        ("memory", "r1", "event", 500, "400: param 'lr' too long")]
    # The quarantined event is in a WAL that `wal replay` reads.
    with WALReader(rows[0]["location"]) as reader:
        items, _ = reader.read(WalCursor(), max_events=10)
    [(_, payload)] = items
    assert decode_event(payload) == Metrics("r1", 499, 499.0, {"x": 499.0})
    wal.close()


def test_only_runs_that_named_the_sink(tmp_path: Path) -> None:
    wal = WAL(tmp_path / "wal")
    fill_wal(wal, 10, run_id="mine", sinks=("store", "picky"))
    fill_wal(wal, 10, run_id="other", sinks=("store",))
    sink = InMemorySink("picky", all_runs=False)
    runner = SinkRunner(sink, WALReader(tmp_path / "wal"), CursorStore(tmp_path / "db.sqlite"), policy=FAST)
    anyio.run(run_until, runner, lambda: runner.caught_up)
    assert {ev.run_id for _, ev in sink.events} == {"mine"} and len(sink.events) == 11
    assert CursorStore(tmp_path / "db.sqlite").load("picky")[1] == {"mine"}
    wal.close()


def test_store_sink_is_exactly_once_across_redelivery(tmp_path: Path) -> None:
    """A crash between the backend's ack and the cursor commit: the store commits both in one transaction."""
    wal = WAL(tmp_path / "wal")
    fill_wal(wal, 2000)
    db = tmp_path / "db.sqlite"
    sink = LocalStoreSink(db)
    runner = SinkRunner(sink, WALReader(tmp_path / "wal"), CursorStore(db), policy=FAST)
    anyio.run(run_until, runner, lambda: runner.stats.delivered >= 1000)
    # Second runner from whatever was committed: must not duplicate.
    runner2 = SinkRunner(LocalStoreSink(db), WALReader(tmp_path / "wal"), CursorStore(db), policy=FAST)
    anyio.run(run_until, runner2, lambda: runner2.caught_up)
    s = Store(db)
    total, steps = s.metric_count(), s.metric_arrays("r1", "x")[0].tolist()
    s.close()
    assert total == 2000 and steps == list(range(2000))  # every step once
    wal.close()


def test_retry_policy_backoff_jitter_and_retry_after() -> None:
    p = RetryPolicy(initial=1.0, maximum=10.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(1)
    delays = [p.delay(a, rng) for a in range(1, 8)]
    for a, d in enumerate(delays, start=1):
        base = min(10.0, 2.0 ** (a - 1))
        assert base * 0.5 <= d <= base
    assert p.delay(1, rng, retry_after=7.0) == 7.0
    # A Retry-After past our cap is capped: `Retry-After: 86400` must not park a sink for a day.
    assert p.delay(1, rng, retry_after=120.0) == 10.0
    assert p.delay(1, rng, retry_after=86400.0) == p.maximum


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(threshold=3, reset_after=10.0, clock=lambda: now[0])
    for _ in range(2):
        b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow() and b.wait_time() == 10.0
    now[0] = 10.0
    assert b.state == "half-open" and b.allow()
    b.record_failure()  # the probe failed: open again
    assert b.state == "open"
    now[0] = 25.0
    b.record_success()
    assert b.state == "closed" and b.failures == 0


@pytest.mark.parametrize("n", [0, 1])
def test_empty_wal_runner_is_caught_up(tmp_path: Path, n: int) -> None:
    wal = WAL(tmp_path / "wal")
    if n:
        fill_wal(wal, 0)
    sink = InMemorySink()
    runner = SinkRunner(sink, WALReader(tmp_path / "wal"), CursorStore(tmp_path / "db.sqlite"), policy=FAST)
    anyio.run(run_until, runner, lambda: runner.caught_up)
    assert len(sink.events) == n
    wal.close()


def test_a_sink_that_passes_over_a_flood_catches_up_from_the_shared_cache(tmp_path: Path) -> None:
    """A sink serving none of the runs that log is not woken for their events; once it lags far behind and
    the feed's cache is about to drop them, it is woken to pass over them from memory: every event is
    decoded once, though that sink never polled (its safety poll is a minute away)."""
    from flightlog.agent.runner import CATCH_UP_EVENTS, WalFeed

    wal = WAL(tmp_path / "wal", segment_bytes=1 << 30)
    buf = bytearray()
    append_frame(buf, encode_event(RunStart("r1", "name", 0.0, sinks=["memory"])))
    wal.append(buf, 1, "test")
    feed = WalFeed(WALReader(tmp_path / "wal", limit=lambda: wal.end_position()))
    cursors = CursorStore(tmp_path / "db.sqlite")
    mine, other = InMemorySink(batch_size=5000), InMemorySink("other", all_runs=False)
    runners = [SinkRunner(s, feed, cursors, policy=FAST, linger=0.0, idle_sleep=60.0, tail=lambda: wal.next_seq)
               for s in (mine, other)]
    chunks, per = 24, 1000

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for r in runners:
                tg.start_soon(r.run)
            with anyio.fail_after(30):
                while any(r.core is None for r in runners):
                    await anyio.sleep(0.01)
                for r in runners:
                    r.wake(wal.next_seq)  # the RunStart: "other" learns r1 is not its run
                while "r1" not in runners[1].core.ignored:  # type: ignore[union-attr]
                    await anyio.sleep(0.01)
                for c in range(chunks):
                    buf = bytearray()
                    for i in range(per):
                        append_frame(buf, encode_event(Metrics("r1", c * per + i, 0.0, {"x": 1.0})))
                    wal.append(buf, per, "test")
                    for r in runners:
                        r.wake(wal.next_seq, {"r1"})
                    while runners[0].stats.delivered < (c + 1) * per:  # "memory" reads each as it lands
                        await anyio.sleep(0.005)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert len(mine.events) == chunks * per + 1
    assert other.events == []
    core = runners[1].core
    assert core is not None
    lag = wal.next_seq - core.read_cursor.seq
    assert lag < chunks * per // 2 and lag <= CATCH_UP_EVENTS + 8 * per  # it kept up without its poll
    assert feed.decoded == chunks * per + 1  # nothing decoded twice
