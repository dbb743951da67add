"""Metrics events into numpy columns with no Python work per event: one msgspec encode of the batch, read back
with numpy over each stretch of events of one byte layout; the rest goes ``PointBuffer``'s plain way."""
from __future__ import annotations

import functools
from typing import NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from flightlog.proto.events import Metrics

__all__ = ["FAST", "MIN_ROWS", "Segment", "segments"]

_ENC = msgspec.msgpack.Encoder()
#: The layout read here is Metrics' own (array_like, tag "m", these fields in this order); another one is
#: never guessed at: every batch then goes the plain way.
FAST = (Metrics.__struct_config__.array_like and Metrics.__struct_config__.tag == "m"
        and Metrics.__struct_fields__ == ("run_id", "step", "timestamp", "values", "rank"))
_HEAD = b"\x96\xa1m"  # an array of 6: the tag "m", then the fields
MIN_ROWS = 16  # a shorter stretch of one layout is not worth numpy's per-call cost: the plain way
_MAX_MISSES = 4  # short stretches before the rest of a batch goes the plain way


class Segment(NamedTuple):
    """Events ``start``..``stop`` (indices into the batch) of one layout: one run, the same keys in the same
    order, float timestamps and values, steps and ranks of one msgpack integer width. Their columns (the values
    a row per key, each C-contiguous); ``columns`` False: none, take those events the plain way."""

    start: int
    stop: int
    run_id: str
    keys: list[str]
    steps: npt.NDArray[np.int64]
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    ranks: npt.NDArray[np.int64]
    columns: bool


class _Int(NamedTuple):
    """A msgpack integer at ``at``: its first byte's class and the bytes that follow it."""

    at: int
    marker: int  # the first byte; -1: a positive fixint, -2: a negative fixint (the byte is the value)
    size: int  # payload bytes after the marker (0 for a fixint)
    signed: bool


class _Layout(NamedTuple):
    length: int
    run_id: str
    keys: list[str]
    fixed: npt.NDArray[np.intp]  # the bytes every event of the stretch has as the first one
    template: npt.NDArray[np.uint8]  # the first one's there
    #: bytes of which only some bits must be the first one's: (where, mask, bits) of a fixint's class or an
    #: unsigned 64-bit int's top bit (read as int64: below 2**63 only)
    classes: tuple[tuple[int, int, int], ...]
    fields: np.dtype[np.void]  # step, ts, v0, v1, ..., rank at their offsets in an event


_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_SINT = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}


def _int(buf: bytes, p: int) -> _Int | None:
    b = buf[p]
    if b < 0x80:
        return _Int(p, -1, 0, False)
    if b >= 0xE0:
        return _Int(p, -2, 0, True)
    if b in _UINT:
        if b == 0xCF and buf[p + 1] >= 0x80:
            return None  # past int64: the plain way says so (OverflowError)
        return _Int(p, b, _UINT[b], False)
    if b in _SINT:
        return _Int(p, b, _SINT[b], True)
    return None


def _str(buf: bytes, p: int) -> tuple[str, int] | None:
    """A msgpack string at ``p``: its text and where it ends."""
    b = buf[p]
    if 0xA0 <= b <= 0xBF:
        n, p = b & 0x1F, p + 1
    elif b == 0xD9:
        n, p = buf[p + 1], p + 2
    elif b == 0xDA:
        n, p = int.from_bytes(buf[p + 1:p + 3], "big"), p + 3
    else:
        return None
    return buf[p:p + n].decode("utf-8"), p + n


def _layout(buf: bytes, p0: int) -> _Layout | None:
    """The layout of the event encoded at ``p0``; None for one read the plain way (not a float timestamp or
    value, no values, an integer past int64). ``buf`` is msgspec's own encoding of Metrics events: well formed."""
    try:
        if buf[p0:p0 + 3] != _HEAD:
            return None
        run = _str(buf, p0 + 3)
        if run is None:
            return None
        run_id, p = run
        step = _int(buf, p)
        if step is None:
            return None
        p = step.at + 1 + step.size
        if buf[p] != 0xCB:
            return None
        ts, p = p + 1, p + 9
        if 0x81 <= buf[p] <= 0x8F:
            count, p = buf[p] & 0x0F, p + 1
        elif buf[p] == 0xDE:
            count, p = int.from_bytes(buf[p + 1:p + 3], "big"), p + 3
        else:
            return None
        keys, values = [], []
        for _ in range(count):
            key = _str(buf, p)
            if key is None or buf[key[1]] != 0xCB:
                return None
            keys.append(key[0])
            values.append(key[1] + 1)
            p = key[1] + 9
        rank = _int(buf, p)
        if rank is None:
            return None
        end = rank.at + 1 + rank.size
    except (IndexError, UnicodeDecodeError):
        return None
    length = end - p0
    fixed, classes, dtype = _shape(length, ts - p0, tuple(v - p0 for v in values), step._replace(at=step.at - p0),
                                   rank._replace(at=rank.at - p0))
    return _Layout(length, run_id, keys, fixed, np.frombuffer(buf, np.uint8, length, p0)[fixed], classes, dtype)


@functools.lru_cache(maxsize=256)
def _shape(length: int, ts: int, values: tuple[int, ...], step: _Int, rank: _Int) -> tuple[
        npt.NDArray[np.intp], tuple[tuple[int, int, int], ...], np.dtype[np.void]]:
    """What a layout's offsets imply, the same for every batch of it: the bytes that must be the first event's,
    the class bits of its fixints (and of an unsigned 64-bit int), the fields to read."""
    mask = np.full(length, 0xFF, np.uint8)
    fields = [("ts", ">f8", ts), *((f"v{i}", ">f8", v) for i, v in enumerate(values))]
    for _, _, at in fields:
        mask[at:at + 8] = 0
    classes: list[tuple[int, int, int]] = []
    for name, i in (("step", step), ("rank", rank)):
        if i.marker < 0:  # a fixint: the byte is the value, its top bits the class
            mask[i.at] = 0
            classes.append((i.at, 0x80, 0) if i.marker == -1 else (i.at, 0xE0, 0xE0))
            fields.append((name, "i1", i.at))
            continue
        mask[i.at + 1:i.at + 1 + i.size] = 0
        if i.marker == 0xCF:  # an unsigned 64-bit int read as int64: only below 2**63
            classes.append((i.at + 1, 0x80, 0))
        fields.append((name, f">{'i' if i.signed else 'u'}{i.size}", i.at + 1))
    names, formats, offsets = zip(*fields, strict=True)
    dtype = np.dtype({"names": list(names), "formats": list(formats), "offsets": list(offsets), "itemsize": length})
    return np.flatnonzero(mask), tuple(classes), dtype


def _matching(rows: npt.NDArray[np.uint8], lay: _Layout) -> int:
    """How many leading rows have the layout (the first always does)."""
    bad = (rows[:, lay.fixed] != lay.template).any(axis=1)
    for at, mask, bits in lay.classes:
        bad |= (rows[:, at] & mask) != bits
    first = int(bad.argmax())
    return first if bad[first] else len(rows)


def _columns(buf: bytes, pos: int, count: int, lay: _Layout) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64],
                                                                        npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Steps, timestamps, values (a row per key) and ranks of ``count`` events of the layout at ``pos``."""
    rec = np.frombuffer(buf, lay.fields, count, pos)
    values = np.empty((len(lay.keys), count), np.float64)
    for i in range(len(lay.keys)):
        values[i] = rec[f"v{i}"]
    return rec["step"].astype(np.int64), rec["ts"].astype(np.float64), values, rec["rank"].astype(np.int64)


def _plain(start: int, stop: int) -> Segment:
    empty_i, empty_f = np.empty(0, np.int64), np.empty(0, np.float64)
    return Segment(start, stop, "", [], empty_i, empty_f, np.empty((0, 0)), empty_i, False)


def segments(events: list[Metrics], *, min_rows: int = MIN_ROWS) -> list[Segment]:
    """The batch cut into stretches of one layout (of ``min_rows`` events or more), read as columns, and the
    events between them (to be taken the plain way), in order: together they cover every event once."""
    if not FAST or not events:
        return [_plain(0, len(events))]
    try:
        buf = _ENC.encode(events)
    except (OverflowError, TypeError, msgspec.EncodeError):  # an int past 64 bits, a value of another type
        return [_plain(0, len(events))]  # the plain way says what is wrong with which event
    n = len(events)
    pos = 1 if n < 16 else 3 if n < 1 << 16 else 5  # the array's header
    out: list[Segment] = []
    i = misses = 0
    while i < n:
        lay = _layout(buf, pos)
        if lay is None:
            j = 1
            length = len(_ENC.encode(events[i]))
        else:
            length = lay.length
            count = min(n - i, (len(buf) - pos) // length)
            rows = np.frombuffer(buf, np.uint8, count * length, pos).reshape(count, length)
            j = _matching(rows, lay)
        if lay is None or j < min_rows:
            misses += 1
            if misses > _MAX_MISSES:
                out.append(_plain(i, n))
                return out
            out.append(_plain(i, i + j))
        else:
            out.append(Segment(i, i + j, lay.run_id, lay.keys, *_columns(buf, pos, j, lay), True))
        i += j
        pos += j * length
    return out
