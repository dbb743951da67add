"""Per-run delivery counts: two runs on one real agent, one of them with a webhook that is down. Each tracker's
``health()`` and finish() summary give its own run's numbers per sink (delivered, pending, parked), which
match the events it logged (counted in the agent's WAL), not the node's totals. And the index behind
"pending" on its own: a WAL of interleaved runs, counted from several cursors, read once."""
from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from conftest_backends import run_events, write_wal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flightlog
from flightlog.agent import run_counts
from flightlog.agent.run_counts import RunIndex, count_delivered
from flightlog.agent.wal import WAL, WALReader
from flightlog.agent.wal.format import WalCursor
from flightlog.proto.codec import decode_event, encode_event
from flightlog.proto.errors import ProtocolError
from flightlog.proto.events import Event, Metrics
from flightlog.proto.frames import append_frame
from flightlog.proto.paths import AgentPaths

pytestmark = pytest.mark.timeout(120)


def _wal_counts(wal_dir: Path) -> Counter[str]:
    """Events per run in the WAL, decoded in full (the reference the agent's counts must match)."""
    out: Counter[str] = Counter()
    with WALReader(wal_dir) as reader:
        cursor = WalCursor()
        while True:
            items, cursor = reader.read(cursor, max_events=10_000)
            if not items:
                return out
            out.update(decode_event(p).run_id for _, p in items)


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on: connection refused, retried for ever
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def _config(tmp_path: Path, name: str, **notify: Any) -> dict[str, Any]:
    return {
        "tracking": {"use_tensorboard": False},
        "checkpointing": {"checkpoint_dir": str(tmp_path / name)},
        "monitoring": {"log_gpu_usage": False, "log_memory_usage": False, "create_plots": False},
        "agent": {"autostart": False},
        "notify": {"after_seconds": 3600.0, "finish_wait_seconds": 20.0, **notify},
    }


def _settled(tracker: flightlog.ExperimentTracker, want: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        report = tracker.health()
        if report["sinks"]["store"]["delivered"] == want:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.1)


def test_each_run_gets_its_own_counts(agent_paths: AgentPaths, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    agent = AgentProcess(agent_paths).start()
    try:
        a = flightlog.ExperimentTracker("behind", _config(tmp_path, "a", webhook_url=_dead_url()))
        b = flightlog.ExperimentTracker("plain", _config(tmp_path, "b"))
        a.log_metrics({"loss": float("nan")}, step=0)  # news for the webhook: its post fails and is retried
        for step in range(1, 30):
            a.log_metrics({"loss": float(step)}, step=step)
        for step in range(70):
            b.log_metrics({"loss": float(step)}, step=step)
        a.flush()
        b.flush()
        counts = _wal_counts(agent_paths.wal_dir)
        n_a, n_b = counts[a.run_id], counts[b.run_id]
        assert n_a >= 30 and n_b >= 70 and n_a != n_b
        ra, rb = _settled(a, n_a), _settled(b, n_b)
        store_a, hook = ra["sinks"]["store"], ra["sinks"]["webhook"]
        assert (store_a["status"], store_a["pending"], store_a["parked"]) == ("delivered", 0, False)
        # The webhook is down: every event of this run (and none of the other's) waits for it.
        assert hook["status"] in ("retrying", "pending") and hook["delivered"] == 0, hook
        assert hook["pending"] == n_a and hook["kept_events"] == n_a and not hook["parked"], hook
        assert set(rb["sinks"]) == {"store"}  # the other run is not the webhook's
        assert rb["sinks"]["store"] == {**rb["sinks"]["store"], "status": "delivered", "delivered": n_b,
                                        "pending": 0}
        capsys.readouterr()
        a.finish()
        b.finish()
        err = capsys.readouterr().err
        summary_a = err[err.index("delivery of run 'behind'"):err.index("delivery of run 'plain'")]
        summary_b = err[err.index("delivery of run 'plain'"):]
        # finish() adds the RunEnd: one more event each.
        assert f"local store: delivered ({n_a + 1:,} events)" in summary_a, summary_a
        assert f"[0 delivered, {n_a + 1:,} pending]" in summary_a, summary_a
        assert f"local store: delivered ({n_b + 1:,} events)" in summary_b and "webhook" not in summary_b, err
    finally:
        agent.stop()


def test_run_index_counts_each_runs_events_from_any_cursor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = run_events("ra", "a", {}, steps=40, keys=["x"], sinks=[])
    b = run_events("rb", "b", {}, steps=25, keys=["x"], sinks=[])
    events: list[Event] = []
    for i in range(max(len(a), len(b))):  # interleaved one by one: no record holds one run only
        events += a[i:i + 1] + b[i:i + 1]
    total = write_wal(tmp_path / "wal", events, per_record=7)
    index = RunIndex(str(tmp_path / "wal"))
    with WALReader(tmp_path / "wal") as reader:
        _, mid = reader.read(WalCursor(), max_events=21)  # a cursor part-way, as a sink's
    got = index.pending("ra", [WalCursor(), mid], 50, total)
    seqs_a = [i for i, ev in enumerate(events) if ev.run_id == "ra"]
    assert got == [(sum(1 for s in seqs_a if s < 50), len(a)),
                   (sum(1 for s in seqs_a if mid.seq <= s < 50), sum(1 for s in seqs_a if s >= mid.seq))]
    assert index.pending("rb", [mid], total, total) == [(sum(1 for ev in events[mid.seq:] if ev.run_id == "rb"),) * 2]
    assert index.decoded == total  # the second look read nothing again
    assert index.pending("nobody", [mid], total, total) == [(0, 0)]
    index.close()
    # A look reads a bounded stretch: counts up to indexed_to are exact, and the next looks go on from there.
    monkeypatch.setattr(run_counts, "LOOK_EVENTS", 10)
    index = RunIndex(str(tmp_path / "wal"))
    first = index.pending("ra", [WalCursor()], total, total)
    assert 0 < index.indexed_to < total and first[0][0] < len(a)
    while index.indexed_to < total:
        last = index.pending("ra", [WalCursor()], total, total)
    assert last == [(len(a), len(a))] and index.decoded == total
    index.close()
    per_run: dict[str, int] = {}
    count_delivered(per_run, list(enumerate(events[:10])), {"ra", "rb"})
    count_delivered(per_run, list(enumerate(a[:3])), {"ra"})
    assert per_run == {"ra": 8, "rb": 5}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(
    [encode_event(Metrics("ra", 1, 0.0, {"x": 1.0})), encode_event(Metrics("rb", 1, 0.0, {}))])), max_size=40))
def test_run_index_takes_any_payload(tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes]) -> None:
    """Whatever a WAL frame holds, the index counts the events it can read the run of, and raises nothing."""
    wal_dir = tmp_path_factory.mktemp("wal")
    buf = bytearray()
    for p in payloads:
        append_frame(buf, p)
    with WAL(wal_dir, fsync="never") as wal:
        if payloads:
            wal.append(buf, len(payloads), "fuzz")
    index = RunIndex(str(wal_dir))
    try:
        got = index.pending("ra", [WalCursor()], len(payloads), len(payloads))
    finally:
        index.close()
    want = 0
    for p in payloads:
        try:
            want += decode_event(p).run_id == "ra"
        except ProtocolError:
            pass
    assert got[0][0] == got[0][1] >= want  # a frame only the head of which decodes still counts
