"""Events larger than a spill read chunk go through the spill file whole; an event larger than any path can
carry is refused at the call, with the limit in the message (issue 10, item 2)."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import msgspec
import pytest
from conftest import AgentProcess, new_id

import flightlog
from flightlog.proto.codec import encode_event
from flightlog.proto.errors import EventTooLarge
from flightlog.proto.events import EventBatch, Text
from flightlog.proto.frames import MAX_EVENT_BYTES, check_event_size
from flightlog.proto.paths import AgentPaths
from flightlog.ring import RingProducer


def _texts(store: Path, run_id: str) -> list[tuple[str, int, str]]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return [(k, s, t) for k, s, t in db.execute("SELECT key, step, text FROM texts WHERE run_id=? ORDER BY ts",
                                                    (run_id,))]
    finally:
        db.close()


def _status(store: Path, run_id: str) -> str:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return str(row[0]) if row else ""
    finally:
        db.close()


def test_six_mib_text_through_the_spill_file_arrives_and_finish_is_prompt(agent_paths: AgentPaths,
                                                                          base_config: dict) -> None:
    """Agent down, ring full: a 6 MiB log_text goes to the spill file between small events; once an agent
    runs, it arrives whole and in order, and finish() returns at once instead of timing out its flush."""
    cfg = {**base_config, "agent": {"autostart": False, "ring_bytes": 1 << 20}}
    run_id = "bigspill" + new_id()
    big = "".join(chr(0x41 + i % 26) for i in range(6 << 20))  # 6 MiB, not compressible into a short frame
    t = flightlog.ExperimentTracker("big-spill", cfg, run_id=run_id)
    for i in range(60_000):  # no agent: fills the 1 MiB ring, the rest spills
        t.log_metrics({"x": float(i)}, step=i)
    assert t._producer is not None and t._producer.spilled > 0
    t.log_text("before", "small one", step=1)
    t.log_text("big", big, step=2)
    t.log_text("after", "small two", step=3)
    agent = AgentProcess(agent_paths).start()
    try:
        t0 = time.monotonic()
        t.finish()
        took = time.monotonic() - t0
        assert took < 30, f"finish() took {took:.1f} s (the flush timed out?)"
        texts = _texts(agent_paths.store, run_id)
        deadline = time.monotonic() + 60
        while len(texts) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            texts = _texts(agent_paths.store, run_id)
        assert [(k, s) for k, s, _ in texts] == [("before", 1), ("big", 2), ("after", 3)]
        assert texts[1][2] == big
        deadline = time.monotonic() + 30
        while _status(agent_paths.store, run_id) != "completed" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(agent_paths.store, run_id) == "completed"
        assert "dropped" not in agent.read_log()
    finally:
        agent.stop()


def test_over_limit_event_is_refused_at_the_call_naming_the_limit(agent_paths: AgentPaths,
                                                                  base_config: dict) -> None:
    """An event no path can carry (larger than MAX_EVENT_BYTES) is a ValueError at the call, the tracker
    keeps working, and nothing of it reaches a ring or spill file."""
    t = flightlog.ExperimentTracker("too-big", base_config, run_id="toobig" + new_id())
    try:
        with pytest.raises(ValueError, match=f"{MAX_EVENT_BYTES} bytes") as info:
            t.log_text("huge", "x" * (MAX_EVENT_BYTES + 1))
        assert isinstance(info.value, EventTooLarge)
        assert "log_artifact" in str(info.value)
        with pytest.raises(ValueError, match="MiB"):
            t.log_hyperparameters({"blob": "y" * (MAX_EVENT_BYTES + 10)})
        spilled = t._producer.spilled if t._producer is not None else 0
        assert spilled == 0
        t.log_text("fine", "z" * (MAX_EVENT_BYTES - 4096))  # just under: accepted
        t.log_metrics({"after": 1.0}, step=0)
    finally:
        t.finish()


def test_ring_producer_refuses_an_oversize_frame_even_in_a_ring_that_could_hold_it(tmp_path: Path) -> None:
    """Rings of up to 1 GiB: a frame below the ring's size but above the limit must not slip through the
    fast path (the WAL could not take it as one record: the agent would retry that append for ever)."""
    ring = RingProducer(tmp_path / "r.ring", 64 << 20, "p", tmp_path / "spill")
    try:
        ring.write_frame(b"a" * 100)
        with pytest.raises(EventTooLarge):
            ring.write_frame(bytes(MAX_EVENT_BYTES + 1))
        ring.write_frame(bytes(MAX_EVENT_BYTES))  # exactly the limit: accepted
        ring.write_frame(b"b" * 100)
        assert ring.spilled == 0 and ring.dropped == 0
    finally:
        ring.close(unlink=True)


def test_check_event_size_names_the_event_and_limit() -> None:
    check_event_size(bytes(MAX_EVENT_BYTES))
    payload = encode_event(Text("r", "k", "t" * MAX_EVENT_BYTES))
    with pytest.raises(EventTooLarge, match="16 MiB") as info:
        check_event_size(payload)
    assert "a Text event" in str(info.value) and str(len(payload)) in str(info.value)
    with pytest.raises(EventTooLarge, match="an event encodes"):
        check_event_size(bytes(MAX_EVENT_BYTES + 1))  # not an event's encoding: still refused, unnamed


def test_socket_batch_with_the_largest_event_fits_a_control_frame() -> None:
    """The socket transport sends under 64 KiB of events plus the one that crossed it: with the largest
    event allowed, that batch must still be a control frame the agent reads."""
    from flightlog.agent.control import MAX_CONTROL_FRAME
    from flightlog.transport import _SOCKET_BATCH

    producer_id = "r" * 128 + "-4194304-abcdef"
    batch = EventBatch(producer_id, bytes(_SOCKET_BATCH + MAX_EVENT_BYTES + 8), 1000)
    assert len(msgspec.msgpack.encode(batch)) + 4 <= MAX_CONTROL_FRAME


def test_socket_transport_carries_the_largest_event_and_refuses_a_larger_one(
        agent: AgentProcess, base_config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where rings are not safe, events go in socket batches: one of MAX_EVENT_BYTES must fit the agent's
    control frame (it used to be refused as "control frame too large", the connection closed)."""
    monkeypatch.setenv("FLIGHTLOG_TRANSPORT", "socket")
    run_id = "sockbig" + new_id()
    text = "q" * (MAX_EVENT_BYTES - 1024)
    with flightlog.experiment_tracking("sock-big", base_config, run_id=run_id) as t:
        assert t._producer is None  # the socket transport
        t.log_metrics({"x": 1.0}, step=0)  # a batch already pending when the big one comes
        t.log_text("big", text, step=1)
        with pytest.raises(EventTooLarge, match="a Text event"):
            t.log_text("bigger", text + "q" * 2048, step=2)
        t.flush()
    deadline = time.monotonic() + 60
    texts = _texts(agent.paths.store, run_id)
    while not texts and time.monotonic() < deadline:
        time.sleep(0.1)
        texts = _texts(agent.paths.store, run_id)
    assert [(k, s, len(x)) for k, s, x in texts] == [("big", 1, len(text))]
    assert _status(agent.paths.store, run_id) in ("running", "completed")
