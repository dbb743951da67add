"""Property tests for the codec and the ring (wrap-around, spill hand-over), in one process."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.agent.ingest import split_frames
from flightlog.agent.ring import RingView
from flightlog.proto import ProtocolError, decode_control, decode_event, encode_event
from flightlog.proto.codec import event_encoder
from flightlog.proto.events import (
    Artifact,
    CheckpointSaved,
    HyperParams,
    Metrics,
    RunEnd,
    RunStart,
    SystemStats,
    Tags,
    Text,
)
from flightlog.proto.frames import count_frames, iter_frames
from flightlog.proto.ring import spill_path
from flightlog.ring import RingProducer

names = st.text(min_size=1, max_size=20)
floats = st.floats(allow_nan=False)  # NaN != NaN; checked separately below
run_ids = st.text(alphabet="0123456789abcdef", min_size=1, max_size=16)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), floats, st.text(max_size=30))

events = st.one_of(
    st.builds(Metrics, run_ids, st.integers(0, 2**62), floats, st.dictionaries(names, floats, max_size=8)),
    st.builds(RunStart, run_ids, names, floats, description=st.text(max_size=50), tags=st.lists(names, max_size=3),
              config=st.dictionaries(names, scalars, max_size=5), sinks=st.lists(names, max_size=3)),
    st.builds(RunEnd, run_ids, st.sampled_from(["completed", "failed", "killed"]), floats, st.text(max_size=100)),
    st.builds(HyperParams, run_ids, st.dictionaries(names, scalars, max_size=8), floats),
    st.builds(Tags, run_ids, st.dictionaries(names, st.text(max_size=20), max_size=5), floats),
    st.builds(Text, run_ids, names, st.text(max_size=200), st.integers(0, 2**40), floats),
    st.builds(SystemStats, run_ids, floats, st.dictionaries(names, floats, max_size=8)),
    st.builds(CheckpointSaved, run_ids, names, st.integers(0, 1000), st.integers(0, 2**40), floats),
    st.builds(Artifact, run_ids, names, names, floats),
)


@given(events)
def test_codec_round_trip(event: object) -> None:
    assert decode_event(encode_event(event)) == event  # type: ignore[arg-type]


def test_nan_and_inf_survive() -> None:
    ev = decode_event(encode_event(Metrics("r", 1, 0.0, {"n": float("nan"), "i": float("-inf")})))
    assert ev.values["n"] != ev.values["n"] and ev.values["i"] == float("-inf")  # type: ignore[union-attr]


@given(events, st.data())
def test_truncated_frames_raise_protocol_error(event: object, data: st.DataObject) -> None:
    raw = encode_event(event)  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ProtocolError):
        decode_event(raw[:cut])


@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_error(raw: bytes) -> None:
    # The decoders catch only msgspec's DecodeError: any other exception escapes and fails this test.
    for decode in (decode_event, decode_control):
        try:
            decode(raw)
        except ProtocolError:
            pass


@given(events, st.data())
def test_mutated_frames_raise_only_protocol_error(event: object, data: st.DataObject) -> None:
    raw = bytearray(encode_event(event))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    for decode in (decode_event, decode_control):
        try:
            decode(bytes(raw))
        except ProtocolError:
            pass


class Consumer:
    """What the agent does with a ring, minus the WAL: copy frames out, then advance the read cursor."""

    def __init__(self, path: Path) -> None:
        self.view = RingView(path)
        self.got: list[bytes] = []

    def drain(self) -> None:
        v = self.view
        taken = v.take(v.read_word, v.write_word)
        if taken is not None:
            data, count, after = taken
            frames = [bytes(f) for f in iter_frames(data)]
            assert len(frames) == count == count_frames(data)
            self.got.extend(frames)
            v.read_word = after
        gen = v.spill_gen
        if gen:
            cgen, off = v.consumed
            cgen = max(cgen, 1)
            while True:
                p = spill_path(v.spill_dir, v.producer_id, cgen)
                raw = p.read_bytes()[off:] if p.exists() else b""
                nbytes, _ = split_frames(raw)
                self.got.extend(bytes(f) for f in iter_frames(raw[:nbytes]))
                off += nbytes
                v.set_consumed(cgen, off)
                if cgen >= gen:
                    break
                p.unlink()
                cgen, off = cgen + 1, 0
                v.set_consumed(cgen, 0)


def _ring(tmp_path: Path, size: int = 4096, on_full: str = "spill") -> tuple[RingProducer, Consumer]:
    path = tmp_path / f"{uuid.uuid4().hex}.ring"
    prod = RingProducer(path, size, "p" + uuid.uuid4().hex[:6], tmp_path / "spill", on_full=on_full,
                        block_timeout=0.05)
    return prod, Consumer(path)


def _frame(payload: bytes) -> bytes:
    return payload


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=0, max_size=600), st.booleans()), min_size=1, max_size=300))
def test_ring_wraps_and_spills_in_order(tmp_path: Path, ops: list[tuple[bytes, bool]]) -> None:
    """Any interleaving of writes and drains delivers every payload once, in order (ring, spill, ring...)."""
    prod, cons = _ring(tmp_path)
    sent = []
    for i, (payload, drain) in enumerate(ops):
        payload = i.to_bytes(4, "little") + payload
        prod.write_frame(_frame(payload))
        sent.append(payload)
        if drain:
            cons.drain()
    cons.drain()
    cons.drain()  # a second pass catches frames a producer wrote after leaving the spill
    assert cons.got == sent
    prod.close(unlink=True)
    cons.view.close()


def test_ring_full_spills_then_returns_to_ring(tmp_path: Path) -> None:
    prod, cons = _ring(tmp_path)
    payload = b"x" * 100
    for _ in range(100):  # ~10 KB into a 4 KiB ring with nobody draining
        prod.write_frame(_frame(payload))
    assert prod.spilled > 0 and cons.view.spill_gen == 1
    cons.drain()
    assert len(cons.got) == 100
    w_before = cons.view.write_word
    prod.write_frame(_frame(payload))  # the agent consumed the spill: back to the ring
    assert cons.view.write_word != w_before
    cons.drain()
    assert len(cons.got) == 101


def test_ring_drop_policy_counts(tmp_path: Path) -> None:
    prod, cons = _ring(tmp_path, on_full="drop")
    for _ in range(100):
        prod.write_frame(_frame(b"y" * 100))
    assert prod.dropped > 0 and cons.view.dropped == prod.dropped
    cons.drain()
    assert len(cons.got) == 100 - prod.dropped
    assert not (tmp_path / "spill").exists()


def test_ring_block_policy_waits_then_drops(tmp_path: Path) -> None:
    prod, cons = _ring(tmp_path, on_full="block")
    t0 = time.monotonic()
    for _ in range(40):
        prod.write_frame(_frame(b"z" * 100))
    assert prod.dropped > 0  # nobody drained: each blocked write timed out (50 ms) and was dropped
    assert time.monotonic() - t0 >= 0.05


def test_frame_larger_than_ring_goes_to_spill(tmp_path: Path) -> None:
    prod, cons = _ring(tmp_path)
    big = os.urandom(10_000)
    prod.write_frame(_frame(big))
    cons.drain()
    assert cons.got == [big]


def test_encode_into_reuses_buffer() -> None:
    buf = bytearray(8)
    event_encoder.encode_into(Metrics("r", 1, 0.0, {"a": 1.0}), buf, 4)
    assert decode_event(bytes(buf[4:])) == Metrics("r", 1, 0.0, {"a": 1.0})


def test_cursor_words_wrap_their_counters(tmp_path: Path) -> None:
    """Start just below the 2**35 byte and 2**28 frame counters: spans across the wrap stay exact."""
    from flightlog.proto.ring import BYTE_MASK, FRAME_MASK, OFF_READ, OFF_WRITE, cursor_reached, pack_cursor

    prod, cons = _ring(tmp_path)
    start_bytes = (BYTE_MASK + 1) - 4096 * 3 + 512  # not ring-aligned, so the wrap lands mid-ring
    start_frames = FRAME_MASK - 20
    prod._w = start_bytes
    word = pack_cursor(start_frames, start_bytes)
    prod._word = word
    prod._free_until = start_bytes + prod.size
    prod._cursors[OFF_WRITE // 8] = word
    prod._cursors[OFF_READ // 8] = word
    sent = []
    for i in range(400):
        payload = i.to_bytes(4, "little") + bytes(i % 90)
        prod.write_frame(_frame(payload))
        sent.append(payload)
        if i % 7 == 0:
            cons.drain()
    cons.drain()
    assert cons.got == sent
    assert prod._w > BYTE_MASK and cursor_reached(cons.view.read_word, prod.positions()[0])
