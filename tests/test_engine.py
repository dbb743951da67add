"""The delivery engine without I/O or sleeping: linger and batch-full decisions on an injected clock, poison
isolation (splitting a refused batch down to the bad event, quarantining a run), unknown errors on a capped
schedule; and its shell: one decode per WAL read for every runner, thread-safe wake-ups that do not fire per
event, a long-lived cursor connection."""
from __future__ import annotations

import logging
import math
import random
import threading
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runner import FAST, fill_wal, run_until

from flightlog.agent.engine import (
    Commit,
    Deliver,
    DeliveryCore,
    Persist,
    Read,
    Wait,
    Window,
)
from flightlog.agent.retry import CircuitBreaker, RetryPolicy
from flightlog.agent.runner import CursorStore, SinkRunner, WalFeed
from flightlog.agent.sinks.base import Ack, Batch
from flightlog.agent.sinks.memory import InMemorySink
from flightlog.agent.wal import WAL, WalCursor, WALReader
from flightlog.proto import PermanentBackendError, RetryableBackendError
from flightlog.proto.events import Event, Metrics, RunStart


def window(events: list[Event], first: int = 0) -> Window:
    items = list(enumerate(events, start=first))
    return Window(WalCursor(0, 0, first), items, WalCursor(0, 0, first + len(items)))


def metrics(run: str, n: int, first_step: int = 0) -> list[Event]:
    return [Metrics(run, s, float(s), {"x": float(s)}) for s in range(first_step, first_step + n)]


def core(**kw) -> DeliveryCore:  # type: ignore[no-untyped-def]
    kw.setdefault("policy", RetryPolicy(initial=1.0, maximum=4.0, jitter=0.0))
    kw.setdefault("breaker", CircuitBreaker(threshold=1000, clock=lambda: 0.0))
    return DeliveryCore("s", kw.pop("batch_size", 100), kw.pop("all_runs", True), **kw)


# --- linger and batch size ------------------------------------------------------------------------


def test_a_trickle_waits_for_the_linger_time_not_per_event() -> None:
    c = core(linger=0.15)  # a sink of every run (the store): linger first, then one read takes it all
    c.on_tail(3)  # three events arrived at t=10
    assert c.step(10.0) == Wait(10.15)
    c.on_tail(5)  # two more: still lingering, same deadline
    assert c.step(10.1) == Wait(10.15)
    assert c.step(10.15) == Read(WalCursor())
    c.on_read(window(metrics("r", 5)), 10.15)
    act = c.step(10.15)
    assert isinstance(act, Deliver) and [s for s, _ in act.batch.events] == [0, 1, 2, 3, 4]
    c.on_ack(Ack(5), 10.2)
    assert c.step(10.2) == Commit(WalCursor(0, 0, 5), frozenset())
    c.on_committed(WalCursor(0, 0, 5), (), 10.2)
    assert c.step(10.2) == Wait(None) and c.caught_up()


def test_a_sink_of_some_runs_looks_at_once_and_lingers_for_its_own_events() -> None:
    c = core(linger=0.15, all_runs=False, runs={"r"})
    c.on_tail(3)  # three events arrived at t=10: look at once (are they this sink's?)
    assert c.step(10.0) == Read(WalCursor())
    c.on_read(window(metrics("r", 3)), 10.0)  # they are: the linger starts
    assert c.step(10.0) == Wait(10.15)
    c.on_tail(5)  # two more: still lingering, same deadline
    assert c.step(10.1) == Wait(10.15)
    assert c.step(10.15) == Read(WalCursor(0, 0, 3))  # the deadline: the rest joins the batch
    c.on_read(window(metrics("r", 2, 3), first=3), 10.15)
    act = c.step(10.15)
    assert isinstance(act, Deliver) and [s for s, _ in act.batch.events] == [0, 1, 2, 3, 4]


def test_a_lone_event_lingers_without_new_reads() -> None:
    c = core(linger=0.15, all_runs=False, runs={"r"})
    c.on_tail(1)
    assert c.step(0.0) == Read(WalCursor())
    c.on_read(window(metrics("r", 1)), 0.0)
    assert c.step(0.1) == Wait(0.15)  # nothing more in the WAL: wait, do not read again
    act = c.step(0.15)
    assert isinstance(act, Deliver) and [s for s, _ in act.batch.events] == [0]


def test_events_of_runs_the_sink_does_not_serve_cost_no_linger() -> None:
    """A sink that serves none of the runs logging now reads at once and does not linger: a trickle then
    costs it one look per wake-up, not a timer and a look."""
    c = core(all_runs=False, linger=10.0, commit_interval=1.0)
    c.on_tail(2)
    assert c.step(0.0) == Read(WalCursor())
    c.on_read(window(metrics("other", 2)), 0.0)
    assert c.data_since is None and not c.pending
    assert c.wants_wake_at() == 3  # idle again: the next event is worth a look
    assert c.step(0.0) == Commit(WalCursor(0, 0, 2), frozenset())


_RUNS = st.sampled_from(["a", "b", "c"])
_EVENT = st.one_of(st.builds(lambda r, s: Metrics(r, s, 0.0, {"x": 1.0}), _RUNS, st.integers(0, 99)),
                   st.builds(lambda r, named: RunStart(r, r, 0.0, sinks=["s"] if named else ["other"]), _RUNS,
                             st.booleans()))


@given(windows=st.lists(st.lists(_EVENT, min_size=1, max_size=12), min_size=1, max_size=10),
       only=st.one_of(st.none(), st.sets(_RUNS)))
def test_passing_over_a_window_by_its_runs_takes_exactly_what_looking_at_each_event_takes(
        windows: list[list[Event]], only: set[str] | None) -> None:
    """A window whose runs the sink saw start without it is passed over at once; the result is the same
    events and cursors as going through it event by event (a RunStart that names the sink is never missed)."""
    fast, slow = core(all_runs=False, batch_size=1000, only_runs=only), core(all_runs=False, batch_size=1000,
                                                                             only_runs=only)
    first = 0
    for events in windows:
        items = list(enumerate(events, start=first))
        start, end = WalCursor(0, 0, first), WalCursor(0, 0, first + len(items))
        for c, w in ((fast, Window.of(start, items, end)), (slow, Window(start, items, end))):
            c.on_tail(end.seq)
            c.on_read(w, 1.0)
        first = end.seq
    assert fast.pending == slow.pending and fast.read_cursor == slow.read_cursor and fast.done == slow.done
    assert fast.runs == slow.runs and fast.new_runs == slow.new_runs


def test_a_window_of_runs_the_sink_does_not_serve_is_passed_over_without_a_look() -> None:
    c = core(all_runs=False, batch_size=1000)
    c.on_tail(1)
    c.on_read(window([RunStart("a", "a", 0.0, sinks=["other"])]), 1.0)
    assert c.ignored == {"a"}
    # A window that claims only run "a" is not looked into (it would hold a "b" event only if mislabelled):
    items = list(enumerate([*metrics("a", 3), *metrics("b", 1)], start=1))
    c.on_tail(5)
    c.on_read(Window(WalCursor(0, 0, 1), items, WalCursor(0, 0, 5), (), frozenset({"a"}), False), 1.0)
    assert c.pending == [] and c.read_cursor.seq == 5
    assert Window.of(WalCursor(0, 0, 1), items, WalCursor(0, 0, 5)).runs == {"a", "b"}


def test_a_full_batch_goes_at_once_and_is_capped_at_the_batch_size() -> None:
    c = core(batch_size=4, linger=10.0)
    c.on_tail(10)
    assert c.step(0.0) == Read(WalCursor())  # 10 waiting >= 4: no lingering
    c.on_read(window(metrics("r", 10)), 0.0)
    act = c.step(0.0)
    assert isinstance(act, Deliver) and [s for s, _ in act.batch.events] == [0, 1, 2, 3]
    # The batch ends inside the read: its cursor resumes at the next seq.
    assert act.batch.cursor.seq == 4
    c.on_ack(Ack(4), 0.0)
    assert isinstance(c.step(0.0), Commit)  # acked: commit before anything else is sent
    c.on_committed(act.batch.cursor, (), 0.0)
    assert c.step(0.0) == Read(WalCursor(0, 0, 4))


def test_wake_threshold_is_a_full_batch_while_lingering() -> None:
    c = core(batch_size=50, linger=1.0)
    assert c.wants_wake_at() == 1  # idle: the first new event is worth a wake-up
    c.on_tail(1)
    c.step(0.0)
    c.on_read(window(metrics("r", 1)), 0.0)  # lingering now
    assert c.wants_wake_at() == 50  # only a full batch is


def test_cursor_only_advances_commit_lazily() -> None:
    """Events of runs this sink does not serve move the cursor, committed at most once per interval."""
    c = core(all_runs=False, commit_interval=1.0, linger=0.0)
    c.on_tail(3)
    assert c.step(0.0) == Read(WalCursor())
    c.on_read(window(metrics("other", 3)), 0.0)
    assert c.step(0.0) == Commit(WalCursor(0, 0, 3), frozenset())  # never committed: now
    c.on_committed(WalCursor(0, 0, 3), (), 0.0)
    c.on_tail(6)
    c.step(0.0)
    c.on_read(window(metrics("other", 3, 3), first=3), 0.5)
    assert c.step(0.5) == Wait(1.0)
    assert c.step(1.0) == Commit(WalCursor(0, 0, 6), frozenset())


def test_runs_that_name_the_sink_are_committed_with_the_cursor() -> None:
    c = core(all_runs=False, linger=0.0)
    evs: list[Event] = [RunStart("mine", "n", 0.0, sinks=["s"]), *metrics("mine", 2), RunStart("no", "n", 0.0)]
    c.on_tail(4)
    c.step(0.0)
    c.on_read(window(evs), 0.0)
    act = c.step(0.0)
    assert isinstance(act, Deliver) and {ev.run_id for _, ev in act.batch.events} == {"mine"}
    c.on_ack(Ack(3), 0.0)
    assert c.step(0.0) == Commit(WalCursor(0, 0, 4), frozenset({"mine"}))


# --- errors -----------------------------------------------------------------------------------------


def test_retry_after_is_capped_and_the_batch_is_resent_after_it() -> None:
    c = core(linger=0.0)
    c.on_tail(2)
    c.step(0.0)
    c.on_read(window(metrics("r", 2)), 0.0)
    act = c.step(0.0)
    assert isinstance(act, Deliver)
    c.on_error(RetryableBackendError("429", retry_after=86400.0), 0.0)
    assert c.step(0.0) == Wait(4.0)  # RetryPolicy.maximum, not a day
    assert c.step(4.0) == act


def test_unknown_errors_retry_on_the_capped_schedule_traceback_once_per_type() -> None:
    c = core(linger=0.0)
    c.on_tail(1)
    c.step(0.0)
    c.on_read(window(metrics("r", 1)), 0.0)
    c.step(0.0)
    shows = [c.on_error(KeyError("bug"), float(i))[1] for i in range(10)]
    assert shows == [True] + [False] * 9
    assert c.on_error(ZeroDivisionError(), 10.0)[1] is True  # another type: shown once too
    assert c.retry_at - 10.0 <= 4.0  # capped
    assert c.stats.state == "retrying" and "ZeroDivisionError" in c.stats.last_error


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 64), bad=st.data())
def test_a_refused_batch_is_narrowed_down_to_the_bad_event(n: int, bad: st.DataObject) -> None:
    bad_seq = bad.draw(st.integers(0, n - 1))
    c = core(batch_size=64, linger=0.0)
    c.on_tail(n)
    c.step(0.0)
    c.on_read(window(metrics("r", n)), 0.0)
    delivered: list[int] = []
    committed = WalCursor()
    for _ in range(4 * n + 20):
        act = c.step(0.0)
        if isinstance(act, Deliver):
            seqs = [s for s, _ in act.batch.events]
            if bad_seq in seqs:
                c.on_error(PermanentBackendError("no"), 0.0)
            else:
                delivered += seqs
                c.on_ack(Ack(len(seqs)), 0.0)
        elif isinstance(act, Persist):
            assert [[s for s, _ in r.events] for r in act.records] == [[bad_seq]]
            c.on_persisted()
        elif isinstance(act, Commit):
            assert act.cursor.seq >= committed.seq
            committed = act.cursor
            c.on_committed(act.cursor, act.new_runs, 0.0)
        elif isinstance(act, Read):
            c.on_read(None, 0.0)
        else:
            break
    assert delivered == [s for s in range(n) if s != bad_seq]
    assert committed.seq == n and c.caught_up()
    assert c.stats.quarantined_events == 1


def test_a_refused_run_is_quarantined_with_its_later_events_and_runstart() -> None:
    c = core(linger=0.0, scope="run")
    evs: list[Event] = [RunStart("bad", "b", 0.0), *metrics("bad", 2), *metrics("good", 2)]
    c.on_tail(len(evs))
    c.step(0.0)
    c.on_read(window(evs), 0.0)
    act = c.step(0.0)
    assert isinstance(act, Deliver)
    c.on_ack(Ack(2, refused={"bad": "MLflow refused key 'acc@top1'"}), 0.0)
    act2 = c.step(0.0)
    assert isinstance(act2, Persist)
    [rec] = act2.records
    assert rec.scope == "run" and rec.run_id == "bad" and [s for s, _ in rec.events] == [0, 1, 2]
    c.on_persisted()
    assert c.quarantined_runs == {"bad"}
    # Later events of the run go the same way, never to the backend.
    c.on_committed(act.batch.cursor, (), 0.0)
    c.on_tail(7)
    c.step(0.0)
    c.on_read(window([*metrics("bad", 1, 2), *metrics("good", 1, 2)], first=5), 0.0)
    act3 = c.step(0.0)
    assert isinstance(act3, Persist) and not act3.records[0].first
    c.on_persisted()
    act4 = c.step(0.0)
    assert isinstance(act4, Deliver) and [ev.run_id for _, ev in act4.batch.events] == ["good"]


# --- the shell: decode once, wake-ups, cursor connection -------------------------------------------


def test_every_event_is_decoded_once_for_four_sinks(tmp_path: Path) -> None:
    wal = WAL(tmp_path / "wal", segment_bytes=1 << 16)
    fill_wal(wal, 3000, sinks=("a", "b", "c", "d"))
    feed = WalFeed(WALReader(tmp_path / "wal", limit=wal.end_position), window_events=500)
    cursors = CursorStore(tmp_path / "db.sqlite")
    sinks = [InMemorySink(n, batch_size=b, all_runs=False) for n, b in
             (("a", 100), ("b", 1000), ("c", 64), ("d", 5000))]
    runners = [SinkRunner(s, feed, cursors, policy=FAST, linger=0.0) for s in sinks]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for r in runners:
                tg.start_soon(r.run)
            with anyio.fail_after(30):
                while not all(len(s.events) == 3001 for s in sinks):
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)
    for s in sinks:
        assert [seq for seq, _ in s.events] == list(range(3001))
    # The old runner decoded every event once per sink (4 x 3001); windows are shared now.
    print(f"decoded {feed.decoded} of 3001 events for 4 sinks in {feed.reads} reads")
    assert feed.decoded == 3001
    wal.close()


def test_wake_from_a_worker_thread_delivers_without_polling(tmp_path: Path) -> None:
    """``wake`` from another thread (the WAL writers') wakes the runner: the safety poll is an hour here."""
    wal = WAL(tmp_path / "wal")
    fill_wal(wal, 0)
    sink = InMemorySink(batch_size=10)
    runner = SinkRunner(sink, WALReader(tmp_path / "wal", limit=wal.end_position), CursorStore(tmp_path / "db"),
                        policy=FAST, linger=0.0, idle_sleep=3600.0, tail=lambda: wal.next_seq)

    def producer() -> None:
        fill_wal(wal, 25, run_id="r2")
        runner.wake(wal.next_seq)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            with anyio.fail_after(20):
                while not runner.caught_up:
                    await anyio.sleep(0.01)
                t = threading.Thread(target=producer)
                t.start()
                while len(sink.events) < 27:
                    await anyio.sleep(0.01)
                t.join()
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert len(sink.events) == 27
    wal.close()


def test_wakes_below_the_threshold_do_not_signal(tmp_path: Path) -> None:
    runner = SinkRunner(InMemorySink(), WALReader(tmp_path), CursorStore(tmp_path / "db"))
    runner._armed = 500
    for seq in range(100, 499):
        runner.wake(seq)
    assert not runner._woken
    runner.wake(500)
    assert runner._woken


def test_cursor_store_keeps_one_connection(tmp_path: Path) -> None:
    cs = CursorStore(tmp_path / "db.sqlite")
    cs.save("s", WalCursor(0, 40, 1))
    conn = cs._store.db
    for i in range(2, 50):
        cs.save("s", WalCursor(0, 40, i), {"r"} if i == 2 else ())
    assert cs._store.db is conn
    assert cs.load("s") == (WalCursor(0, 40, 49), {"r"})
    cs.close()


def test_unknown_error_traceback_logged_once_at_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    def broken(batch: Batch) -> None:
        calls["n"] += 1
        if calls["n"] <= 4:
            raise KeyError("library bug")

    wal = WAL(tmp_path / "wal")
    fill_wal(wal, 5)
    sink = InMemorySink(fail=broken)
    runner = SinkRunner(sink, WALReader(tmp_path / "wal"), CursorStore(tmp_path / "db"), policy=FAST,
                        rng=random.Random(0))
    with caplog.at_level(logging.WARNING, "flightlog.agent"):
        anyio.run(run_until, runner, lambda: len(sink.events) == 6)
    traced = [r for r in caplog.records if r.exc_info and r.levelno == logging.WARNING]
    assert len(traced) == 1 and "KeyError" in traced[0].getMessage()
    assert sum("KeyError" in r.getMessage() for r in caplog.records) == 4
    assert not math.isinf(runner.stats.cursor.seq)
    wal.close()


def test_a_sink_is_not_woken_for_runs_it_has_passed_over() -> None:
    """Events of a run that does not name the sink do not wake it (it reads past them on its next look);
    its own runs and runs it has not seen yet (their RunStart may name it) do."""
    c = core(all_runs=False, linger=0.0)
    evs: list[Event] = [RunStart("mine", "n", 0.0, sinks=["s"]), RunStart("other", "n", 0.0), *metrics("other", 2)]
    c.on_tail(4)
    assert c.step(0.0) == Read(WalCursor())
    c.on_read(window(evs), 0.0)
    assert c.wants_any({"mine"}) and c.wants_any({"new"}) and c.wants_any({"other", "new"})
    assert not c.wants_any({"other"})
    assert core(all_runs=True).wants_any({"anything"})


def test_wake_with_the_runs_of_new_events_skips_a_sink_that_does_not_want_them(tmp_path: Path) -> None:
    runner = SinkRunner(InMemorySink(all_runs=False), WALReader(tmp_path), CursorStore(tmp_path / "db"))
    runner.core = core(all_runs=False)
    runner.core.ignored.add("other")
    runner._armed = 0
    runner.wake(10, {"other"})
    assert not runner._woken
    runner.wake(10, {"other", "mine"})
    assert runner._woken
