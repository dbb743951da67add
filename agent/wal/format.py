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
    "encode_record",
    "decode_record",
    "resync",
    "scan",
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


def encode_segment_header(first_seq: int, created_ns: int, schema_version: int = SCHEMA_VERSION) -> bytes:
    return _SEG.pack(SEGMENT_MAGIC, FORMAT_VERSION, schema_version, first_seq, created_ns)


def decode_segment_header(buf: bytes, where: object) -> SegmentHeader:
    """Parse a segment header; raise WALCorrupt naming ``where`` (the path) if it is not one we can read."""
    if len(buf) < SEGMENT_HEADER_SIZE:
        why = f"only {len(buf)} bytes, a segment header has {SEGMENT_HEADER_SIZE}"
    else:
        magic, fmt, schema, first_seq, created = _SEG.unpack_from(buf)
        if magic == SEGMENT_MAGIC and fmt == FORMAT_VERSION:
            return SegmentHeader(fmt, schema, first_seq, created)
        why = "bad magic" if magic != SEGMENT_MAGIC else f"unsupported format version {fmt}"
    raise WALCorrupt(
        f"{where}: not a flightlog WAL segment ({why}); move it out of the WAL directory "
        "(or restore it from a backup) and start the agent again"
    )


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


def decode_record(buf: bytes, pos: int, end: int) -> Record | Problem:
    """Decode the record at ``buf[pos:]``, using bytes up to ``end`` only; validates bounds and CRC."""
    if end - pos < RECORD_HEADER_SIZE:
        return Problem("truncated", RECORD_HEADER_SIZE)
    magic, length, crc, count, first_seq, src_end, src_gen, kind, pid_len, _ = _HEADER.unpack_from(buf, pos)
    if magic != RECORD_MAGIC:
        return _BAD_MAGIC
    if not RECORD_HEADER_SIZE + pid_len <= length <= MAX_RECORD_BYTES:
        return _BAD_LENGTH
    size = (length + 7) & ~7
    if size > end - pos:  # the padding must be there too, else the next record would start mid-air
        return Problem("truncated", size)
    view = memoryview(buf)
    if zlib.crc32(view[pos + 12 : pos + length]) != crc:
        return _BAD_CRC
    body = pos + RECORD_HEADER_SIZE + pid_len
    pid = str(view[pos + RECORD_HEADER_SIZE : body], "utf-8", "replace")
    return Record(pos, size, count, first_seq, src_end, src_gen, kind, pid, view[body : pos + length])


def resync(buf: bytes, pos: int, end: int) -> int | None:
    """First 8-aligned offset >= ``pos`` (alignment relative to ``buf``) holding a fully valid record."""
    pos = (pos + 7) & ~7
    while (i := buf.find(_MAGIC_BYTES, pos, end)) >= 0:
        if i & 7:
            pos = (i + 7) & ~7
            continue
        # Only a whole record with a good CRC counts, so a stray magic inside a payload is not a boundary.
        if isinstance(decode_record(buf, i, end), Record):
            return i
        pos = i + 8
    return None


def scan(buf: bytes, start: int, end: int) -> Iterator[Record | Gap]:
    """Records of ``buf[start:end]`` in order, with each damaged stretch reported once as a Gap.

    A bad record is never trusted for its length: the scan resumes at the next valid record found by
    ``resync``, so damage can neither merge neighbours nor hide them. A Gap with ``tail=True`` has no
    valid record after it: a torn write in the live segment, plain garbage elsewhere (caller decides).
    """
    pos = start
    while pos < end:
        r = decode_record(buf, pos, end)
        if isinstance(r, Record):
            yield r
            pos += r.size
            continue
        nxt = resync(buf, pos + 8, end)
        if nxt is None:
            yield Gap(pos, end - pos, r.reason, True)
            return
        yield Gap(pos, nxt - pos, r.reason, False)
        pos = nxt
