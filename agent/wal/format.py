"""WAL on-disk format, sans-IO: segment headers, records, and a scan that resyncs past damage.

Everything here works on in-memory ``bytes`` so that recovery, the reader and ``inspect_wal`` share one
definition of "valid record" and one resync rule; the file handling lives in ``log.py``.

Segment header (32 bytes): ``b"FLWALSEG" | u32 format | u32 schema | u64 first_seq | u64 created_ns``.
Record (padded to 8): ``u32 magic | u32 length | u32 crc | u32 count | u64 first_seq | u64 src_end |
u32 src_gen | u8 src_kind | u8 pid_len | u16 0 | producer id | frames``; the CRC covers ``[12:length]``.
Little-endian throughout.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec

from flightlog.proto.errors import WALCorrupt, WALError
from flightlog.proto.events import SCHEMA_VERSION

__all__ = [
    "SEGMENT_MAGIC",
    "FORMAT_VERSION",
    "SEGMENT_HEADER_SIZE",
    "RECORD_MAGIC",
    "RECORD_HEADER_SIZE",
    "MAX_RECORD_BYTES",
    "SRC_RING",
    "SRC_SPILL",
    "SRC_INTERNAL",
    "SegmentHeader",
    "Record",
    "Gap",
    "Problem",
    "WalCursor",
    "encode_segment_header",
    "decode_segment_header",
    "segment_header_problem",
    "encode_record",
    "decode_record",
    "resync",
    "scan",
    "RangeCrc",
    "SEQ_LIMIT",
]

SEGMENT_MAGIC = b"FLWALSEG"
FORMAT_VERSION = 1
_SEG = struct.Struct("<8sIIQQ")
SEGMENT_HEADER_SIZE = _SEG.size  # 32

RECORD_MAGIC = 0x52574C46  # b"FLWR" read as a little-endian u32
_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_HEAD = struct.Struct("<III")  # magic, length, crc: the part the CRC cannot cover
_TAIL = struct.Struct("<IQQIBBH")  # count, first_seq, src_end, src_gen, src_kind, pid_len, reserved
_HEADER = struct.Struct("<IIIIQQIBBH")
RECORD_HEADER_SIZE = _HEADER.size  # 40
#: Upper bound on one record; a larger length field is damage, not a record (keeps resync cheap and safe).
MAX_RECORD_BYTES = 256 << 20
_ZEROS = bytes(8)
#: Seqs are signed 64-bit where they are stored (SQLite cursors); a record or header claiming more is damage.
SEQ_LIMIT = 1 << 63
_MIN_FRAME = 8  # u32 length + padding: the smallest frame, so a record holds at most len(frames) // 8

SRC_RING, SRC_SPILL, SRC_INTERNAL = 0, 1, 2


class WalCursor(msgspec.Struct, frozen=True, array_like=True):
    """Resume point of a reader: a record start (``segment`` = its file's first_seq) and the next seq to deliver."""

    segment: int = 0
    offset: int = 0
    seq: int = 0

    @classmethod
    def start(cls) -> WalCursor:
        return cls(0, 0, 0)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    format_version: int
    schema_version: int
    first_seq: int
    created_ns: int


@dataclass(frozen=True, slots=True)
class Record:
    """One valid record; ``offset`` is relative to the scanned buffer, ``frames`` a view into it."""

    offset: int
    size: int  # padded length on disk
    count: int
    first_seq: int
    src_end: int
    src_gen: int
    src_kind: int
    producer_id: str
    frames: memoryview


@dataclass(frozen=True, slots=True)
class Gap:
    """Bytes that are not a valid record. ``tail``: nothing valid follows it in the scanned range."""

    offset: int
    length: int
    reason: str
    tail: bool


@dataclass(frozen=True, slots=True)
class Problem:
    """Why no record decodes at a position; ``need`` > 0 means "truncated: this many bytes would decide"."""

    reason: str
    need: int = 0


_BAD_MAGIC = Problem("bad magic")
_BAD_LENGTH = Problem("length out of range")
_BAD_CRC = Problem("bad crc")
_BAD_COUNT = Problem("count exceeds the frames the record can hold")
_BAD_SEQ = Problem("seq out of range")


def encode_segment_header(first_seq: int, created_ns: int, schema_version: int = SCHEMA_VERSION) -> bytes:
    return _SEG.pack(SEGMENT_MAGIC, FORMAT_VERSION, schema_version, first_seq, created_ns)


def segment_header_problem(buf: bytes) -> str:
    """Why ``buf`` does not start with a segment header this version reads; "" if it does."""
    if len(buf) < SEGMENT_HEADER_SIZE:
        return f"only {len(buf)} bytes, a segment header has {SEGMENT_HEADER_SIZE}"
    magic, fmt, _schema, first_seq, _created = _SEG.unpack_from(buf)
    if magic != SEGMENT_MAGIC:
        return "bad magic"
    if fmt != FORMAT_VERSION:
        return f"format version {fmt}, this flightlog reads version {FORMAT_VERSION}"
    if first_seq >= SEQ_LIMIT:
        return f"first_seq {first_seq} is out of range"
    return ""


def decode_segment_header(buf: bytes, where: object) -> SegmentHeader:
    """Parse a segment header; raise WALCorrupt naming ``where`` (the path) if it is not one we can read."""
    why = segment_header_problem(buf)
    if why:
        raise WALCorrupt(
            f"{where}: not a flightlog WAL segment ({why}); move it out of the WAL directory "
            "(or restore it from a backup) and start the agent again"
        )
    _magic, fmt, schema, first_seq, created = _SEG.unpack_from(buf)
    return SegmentHeader(fmt, schema, first_seq, created)


def encode_record(
    frames: bytes | bytearray | memoryview,
    count: int,
    first_seq: int,
    producer_id: str,
    src_kind: int = SRC_RING,
    src_gen: int = 0,
    src_end: int = 0,
) -> bytes:
    """One record, padded, as a single bytes object (so the writer needs exactly one ``os.write``).

    Raises WALError for a record the format cannot hold (callers cut large batches: see ``ingest``).
    """
    pid = producer_id.encode()
    if len(pid) > 255:
        raise WALError(f"producer id {producer_id[:40]!r}... is {len(pid)} bytes in UTF-8, at most 255 fit a "
                       "WAL record; use a shorter run id")
    length = RECORD_HEADER_SIZE + len(pid) + len(frames)
    if length > MAX_RECORD_BYTES:
        raise WALError(f"a WAL record of {length} bytes ({count} frames of {producer_id}) exceeds the "
                       f"{MAX_RECORD_BYTES}-byte limit; the caller must cut the batch into several records")
    tail = _TAIL.pack(count, first_seq, src_end, src_gen, src_kind, len(pid), 0)
    # Incremental CRC avoids concatenating before hashing: the frames are copied exactly once, by join.
    crc = zlib.crc32(frames, zlib.crc32(pid, zlib.crc32(tail)))
    return b"".join((_HEAD.pack(RECORD_MAGIC, length, crc), tail, pid, frames, _ZEROS[: -length & 7]))


def decode_record(buf: bytes, pos: int, end: int, crc: RangeCrc | None = None) -> Record | Problem:
    """Decode the record at ``buf[pos:]``, using bytes up to ``end`` only; validates bounds and CRC.

    ``crc`` (the scan's checksummer of ``buf``) keeps the CRC work of a resync linear; without it the range
    is hashed directly."""
    if end - pos < RECORD_HEADER_SIZE:
        return Problem("truncated", RECORD_HEADER_SIZE)
    magic, length, want, count, first_seq, src_end, src_gen, kind, pid_len, _ = _HEADER.unpack_from(buf, pos)
    if magic != RECORD_MAGIC:
        return _BAD_MAGIC
    bad = _header_problem(length, count, first_seq, pid_len, end - pos)
    if bad is not None:
        return bad
    size = (length + 7) & ~7
    view = memoryview(buf)
    got = zlib.crc32(view[pos + 12 : pos + length]) if crc is None else crc.crc(pos + 12, pos + length)
    if got != want:
        return _BAD_CRC
    body = pos + RECORD_HEADER_SIZE + pid_len
    pid = str(view[pos + RECORD_HEADER_SIZE : body], "utf-8", "replace")
    return Record(pos, size, count, first_seq, src_end, src_gen, kind, pid, view[body : pos + length])


def _header_problem(length: int, count: int, first_seq: int, pid_len: int, room: int) -> Problem | None:
    """What is wrong with a record header before its CRC is checked (``room``: bytes from it to the end)."""
    if not RECORD_HEADER_SIZE + pid_len <= length <= MAX_RECORD_BYTES:
        return _BAD_LENGTH
    # Bounded by the bytes it holds, so a crafted count (2**31 in a 64-byte record) cannot move next_seq.
    if count > (length - RECORD_HEADER_SIZE - pid_len) // _MIN_FRAME:
        return _BAD_COUNT
    if first_seq + count > SEQ_LIMIT:
        return _BAD_SEQ
    size = (length + 7) & ~7
    if size > room:  # the padding must be there too, else the next record would start mid-air
        return Problem("truncated", size)
    return None


def resync(buf: bytes, pos: int, end: int, crc: RangeCrc | None = None) -> int | None:
    """First 8-aligned offset >= ``pos`` (alignment relative to ``buf``) holding a fully valid record.

    Linear in ``end - pos`` whatever the bytes: every candidate's CRC goes through ``crc`` (see RangeCrc),
    and the cheap header checks of ``decode_record`` run first (a candidate may sit every 8 bytes).
    """
    pos = (pos + 7) & ~7
    if crc is None:
        crc = RangeCrc(buf, pos, end)
    find, unpack, check, lo = buf.find, _HEADER.unpack_from, _header_problem, RECORD_HEADER_SIZE
    while (i := find(_MAGIC_BYTES, pos, end)) >= 0:
        if i & 7:
            pos = (i + 7) & ~7
            continue
        pos = i + 8
        if end - i < lo:
            return None  # no whole header fits any more: nothing valid follows
        _, length, want, count, first_seq, _, _, _, pid_len, _ = unpack(buf, i)
        # Only a whole record with a good CRC counts, so a stray magic inside a payload is not a boundary.
        if check(length, count, first_seq, pid_len, end - i) is None and crc.crc(i + 12, i + length) == want:
            return i
    return None


def scan(buf: bytes, start: int, end: int, crc: RangeCrc | None = None) -> Iterator[Record | Gap]:
    """Records of ``buf[start:end]`` in order, with each damaged stretch reported once as a Gap.

    A bad record is never trusted for its length: the scan resumes at the next valid record found by
    ``resync``, so damage can neither merge neighbours nor hide them. A Gap with ``tail=True`` has no
    valid record after it: a torn write in the live segment, plain garbage elsewhere (caller decides).
    """
    if crc is None:
        crc = RangeCrc(buf, start, end)
    pos = start
    while pos < end:
        r = decode_record(buf, pos, end, crc)
        if isinstance(r, Record):
            yield r
            pos += r.size
            continue
        nxt = resync(buf, pos + 8, end, crc)
        if nxt is None:
            yield Gap(pos, end - pos, r.reason, True)
            return
        yield Gap(pos, nxt - pos, r.reason, False)
        pos = nxt


# --- CRC of many overlapping ranges in linear time ------------------------------------------------------

_ANCHOR = 512  # prefix CRCs are kept every this many bytes


class RangeCrc:
    """CRC-32 of ranges of one buffer, with total work linear in the buffer whatever ranges are asked for.

    Damage can put a record magic with a plausible length every 8 bytes; hashing each candidate's range
    would make resync quadratic (2 MiB took 65 s). Ranges are hashed directly while the bytes hashed stay
    within twice the buffer (every real scan), then through prefix CRCs: zlib's crc32 is affine in its
    start value, crc(b[s:e]) = P(e) ^ T**(e-s)(P(s)) with P the prefix CRCs and T**n the (linear) effect of
    n zero bytes on a CRC state, applied with one byte table per hex digit of n. ``hashed`` counts the
    bytes fed to zlib (what the tests bound).
    """

    def __init__(self, buf: bytes | bytearray | memoryview, base: int, end: int) -> None:
        self._view = memoryview(buf)
        self._base = base
        self._anchors = [0]  # crc32(buf[base : base + k * _ANCHOR])
        self._direct_budget = 2 * max(0, end - base) + (64 << 10)
        self.hashed = 0

    def crc(self, start: int, stop: int) -> int:
        n = stop - start
        if n <= self._direct_budget:
            self._direct_budget -= n
            self.hashed += n
            return zlib.crc32(self._view[start:stop])
        return self._prefix(stop) ^ _shift(self._prefix(start), n)

    def _prefix(self, p: int) -> int:
        """crc32(buf[base:p]) (``p`` >= base)."""
        k = (p - self._base) // _ANCHOR
        anchors, view = self._anchors, self._view
        while len(anchors) <= k:
            a = self._base + (len(anchors) - 1) * _ANCHOR
            anchors.append(zlib.crc32(view[a : a + _ANCHOR], anchors[-1]))
            self.hashed += _ANCHOR
        a = self._base + k * _ANCHOR
        self.hashed += p - a
        return zlib.crc32(view[a:p], anchors[k])


_DIGITS = 7  # hex digits of a range length: MAX_RECORD_BYTES < 16**7
_TABLES: list[list[list[int]]] = []  # [digit d][value j] -> byte tables of T**(j * 16**d); built on first use


def _shift(v: int, n: int) -> int:
    """T**n(v): the CRC state ``v`` after ``n`` zero bytes, less their own CRC (``n`` < 16**_DIGITS)."""
    tables = _TABLES or _build_tables()
    d = 0
    while n:
        j = n & 15
        if j:
            t = tables[d][j]
            v = t[v & 255] ^ t[256 | (v >> 8) & 255] ^ t[512 | (v >> 16) & 255] ^ t[768 | v >> 24]
        n >>= 4
        d += 1
    return v


def _apply(cols: list[int], v: int) -> int:
    """A 32x32 GF(2) matrix (its columns) times the bit vector ``v``."""
    out, bit = 0, 0
    while v:
        if v & 1:
            out ^= cols[bit]
        v >>= 1
        bit += 1
    return out


def _byte_tables(cols: list[int]) -> list[int]:
    """The matrix as 4 x 256 lookups, one per byte of the input word."""
    t = [0] * 1024
    for q in range(4):
        for x in range(1, 256):
            low = x & -x
            t[q * 256 + x] = t[q * 256 + (x ^ low)] ^ cols[8 * q + low.bit_length() - 1]
    return t


def _build_tables() -> list[list[list[int]]]:
    power = [zlib.crc32(b"\0", 1 << b) ^ zlib.crc32(b"\0") for b in range(32)]  # T: one zero byte
    tables = []
    for _ in range(_DIGITS):
        row: list[list[int]] = [[]]
        acc = power  # T**(j * 16**d) for j = 1, 2, ...
        for _j in range(1, 16):
            row.append(_byte_tables(acc))
            acc = [_apply(power, c) for c in acc]
        tables.append(row)
        power = acc  # T**(16**(d+1))
    _TABLES[:] = tables
    return _TABLES
