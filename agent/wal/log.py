"""WAL file I/O: the appending writer (with crash recovery), the cursor-based reader, and ``inspect_wal``.

Layout: one directory of segments named ``{first_seq:020d}.wal``; only the last one is ever appended to.
A segment recovery cannot read (bad header, wrong name, not a file) is moved into ``quarantine/`` there.
All parsing is delegated to ``format.py``; this module only decides what to do with what it finds.
"""
from __future__ import annotations

import bisect
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from flightlog.proto.errors import ProtocolError, WALError
from flightlog.proto.frames import iter_frames
from flightlog.proto.osutil import fsync_dir

from .format import (
    SEGMENT_HEADER_SIZE,
    SEQ_LIMIT,
    Gap,
    Record,
    SegmentHeader,
    WalCursor,
    decode_segment_header,
    encode_record,
    encode_segment_header,
    scan,
    segment_header_problem,
)

__all__ = [
    "WAL",
    "WALReader",
    "RecoveryReport",
    "SegmentInfo",
    "BadSegment",
    "FsyncMode",
    "inspect_wal",
    "segment_name",
    "QUARANTINE_DIR",
]

log = logging.getLogger("flightlog.wal")

FsyncMode = Literal["interval", "always", "never"]
_HDR = SEGMENT_HEADER_SIZE
_CHUNK = 256 << 10  # reader window; a bigger record or a resync grows it on demand
_LOCK_NAME = ".lock"
#: Where recovery moves the segments it cannot read (kept for ``flightlog wal inspect``, never deleted).
QUARANTINE_DIR = "quarantine"


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.wal"


def _is_segment_name(name: str) -> bool:
    return len(name) == 24 and name.endswith(".wal") and name[:20].isdigit()


def _list_segments(directory: Path) -> list[int]:
    """First seqs of the segment files, ascending (other files are ignored)."""
    return sorted(int(n[:20]) for n in os.listdir(directory) if _is_segment_name(n))


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    path: Path
    first_seq: int
    size: int


@dataclass(frozen=True, slots=True)
class BadSegment:
    """A segment recovery moved aside: its name in the WAL directory, where it is now, and why."""

    name: str
    path: Path
    reason: str


@dataclass(slots=True)
class RecoveryReport:
    truncated_bytes: int = 0
    corrupt_records: int = 0
    skipped_bytes: int = 0
    next_seq: int = 0
    segments: int = 0
    #: (producer_id, src_kind) -> (src_gen, src_end) of the newest valid record (WAL order): where each
    #: source resumes. Newest, not largest: ring cursor words are modular and may wrap.
    producer_positions: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    #: Segments moved into ``quarantine/`` because they could not be read as segments at all.
    bad_segments: list[BadSegment] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A segment file as read: its header and bytes, or why it is not a segment (``buf`` None: not a file)."""

    header: SegmentHeader | None
    buf: bytes | None
    problem: str = ""


def _load_segment(path: Path, first_seq: int) -> _Loaded:
    """Read a segment file without trusting it: a non-regular entry (a directory, a FIFO, a symlink) is
    never opened for reading, so it can neither hang nor redirect recovery."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return _Loaded(None, None, f"not a regular file (mode {stat.filemode(st.st_mode)})")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        buf = f.read()
    why = segment_header_problem(buf)
    if why:
        return _Loaded(None, buf, why)
    hdr = decode_segment_header(buf, path)
    if first_seq >= SEQ_LIMIT:
        return _Loaded(hdr, buf, f"the name's seq {first_seq} is out of range")
    if hdr.first_seq != first_seq:
        return _Loaded(hdr, buf, f"the header says first_seq {hdr.first_seq} but the name says {first_seq} "
                                 "(renamed or copied in by hand?)")
    return _Loaded(hdr, buf)


def _quarantine(directory: Path, name: str, reason: str) -> BadSegment:
    """Move ``directory/name`` into the quarantine directory under a name nothing else uses."""
    qdir = directory / QUARANTINE_DIR
    qdir.mkdir(mode=0o700, exist_ok=True)
    dest, k = qdir / name, 0
    while os.path.lexists(dest):
        k += 1
        dest = qdir / f"{name}.{k}"
    os.rename(directory / name, dest)
    fsync_dir(qdir)
    fsync_dir(directory)
    log.warning("WAL segment %s cannot be read (%s): moved to %s; inspect it with `flightlog wal inspect %s`",
                directory / name, reason, dest, qdir)
    return BadSegment(name, dest, reason)


def _torn_creation(path: Path) -> bool:
    """The last segment is shorter than a header: a crash between creating it and fsyncing its header."""
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_size < _HDR


def _recover(directory: Path) -> RecoveryReport:
    """Validate every segment; cut a torn tail off the last one; move unreadable segments aside.
    Never rewrites anything else."""
    rep = RecoveryReport()
    segs = _list_segments(directory)
    positions = rep.producer_positions
    for i, first in enumerate(segs):
        name = segment_name(first)
        path = directory / name
        is_last = i == len(segs) - 1
        if is_last and _torn_creation(path):  # it never held data
            rep.truncated_bytes += path.stat().st_size
            rep.next_seq = max(rep.next_seq, first)
            path.unlink()
            fsync_dir(directory)
            continue
        got = _load_segment(path, first)
        if got.problem:
            rep.bad_segments.append(_quarantine(directory, name, got.problem))
            if got.buf is not None:  # the records it holds keep their seqs: never handed out twice
                for item in scan(got.buf, _HDR, len(got.buf)):
                    if isinstance(item, Record):
                        rep.next_seq = max(rep.next_seq, item.first_seq + item.count)
            continue
        assert got.header is not None and got.buf is not None
        buf = got.buf
        rep.segments += 1
        rep.next_seq = max(rep.next_seq, got.header.first_seq)
        for item in scan(buf, _HDR, len(buf)):
            if isinstance(item, Record):
                rep.next_seq = max(rep.next_seq, item.first_seq + item.count)
                positions[(item.producer_id, item.src_kind)] = (item.src_gen, item.src_end)
            elif item.tail and is_last:
                with open(path, "r+b") as f:
                    f.truncate(item.offset)
                    os.fsync(f.fileno())
                rep.truncated_bytes += item.length
            else:
                rep.corrupt_records += 1
                rep.skipped_bytes += item.length
    if rep.truncated_bytes or rep.corrupt_records or rep.bad_segments:
        log.warning(
            "WAL %s recovered: cut a torn tail of %d bytes, skipped %d corrupt records (%d bytes), moved %d "
            "unreadable segments to %s; next seq %d",
            directory, rep.truncated_bytes, rep.corrupt_records, rep.skipped_bytes, len(rep.bad_segments),
            directory / QUARANTINE_DIR, rep.next_seq,
        )
    return rep


class WAL:
    """Append-only writer. ``append`` is the ingest hot path: O(1) Python work per record, one write."""

    def __init__(
        self, directory: str | os.PathLike[str], *, segment_bytes: int = 64 << 20, fsync: FsyncMode = "interval"
    ) -> None:
        if fsync not in ("interval", "always", "never"):
            raise ValueError(f"fsync must be 'interval', 'always' or 'never', not {fsync!r}")
        self.directory = Path(directory)
        self._segment_bytes = segment_bytes
        self._fsync_mode: FsyncMode = fsync
        self._always = fsync == "always"
        self._mutex = threading.Lock()  # guards the fd swap on rotation against sync() from another thread
        self._dirty = False
        self._fd = -1
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Two writers on one directory would interleave records and each "repair" the other's tail.
        self._lock_fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            raise WALError(f"{self.directory} is locked by another WAL writer (another agent running?)") from e
        try:
            self.recovery = _recover(self.directory)
            self._next_seq = self.recovery.next_seq
            segs = _list_segments(self.directory)
            if segs:
                self._seg = segs[-1]
                path = self.directory / segment_name(self._seg)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self._size = os.fstat(self._fd).st_size
            else:
                self._open_new_segment()
        except BaseException:
            self.close()
            raise
        self._end = (self._seg, self._size)

    def _open_new_segment(self) -> None:
        first = self._next_seq
        path = self.directory / segment_name(first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, encode_segment_header(first, time.time_ns()))
            os.fsync(fd)  # header and directory entry durable before any record relies on them
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._seg, self._size, self._dirty = fd, first, _HDR, False

    def _rotate(self) -> None:
        old = self._fd
        if self._dirty and self._fsync_mode != "never":
            os.fsync(old)  # sync() only ever sees the live segment, so the old one is settled here
        os.close(old)
        self._fd = -1
        self._open_new_segment()

    def append(
        self,
        frames: bytes | bytearray | memoryview,
        count: int,
        producer_id: str,
        src_kind: int = 0,
        src_gen: int = 0,
        src_end: int = 0,
    ) -> int:
        """Write one record of ``count`` frames (trusted, not re-counted); return the first seq assigned."""
        with self._mutex:
            if self._fd < 0:
                raise WALError(f"WAL {self.directory} is closed")
            seq = self._next_seq
            rec = encode_record(frames, count, seq, producer_id, src_kind, src_gen, src_end)
            try:
                if self._size > _HDR and self._size + len(rec) > self._segment_bytes:
                    self._rotate()
                n = os.write(self._fd, rec)
                if n != len(rec):
                    raise OSError(f"short write: {n} of {len(rec)} bytes")
            except OSError as e:
                if self._fd >= 0:  # drop a partial record now rather than leave it for recovery
                    try:
                        os.ftruncate(self._fd, self._size)
                    except OSError:
                        pass
                raise WALError(f"WAL append to {self.directory} failed: {e}") from e
            self._size += n
            self._next_seq = seq + count
            self._end = (self._seg, self._size)
            if self._always:
                try:
                    os.fsync(self._fd)
                except OSError as e:
                    raise WALError(f"fsync of WAL {self.directory} failed: {e}") from e
            else:
                self._dirty = True
        return seq

    def sync(self) -> None:
        """fsync the live segment if anything was written since the last sync (callable from any thread)."""
        with self._mutex:
            if not self._dirty or self._fd < 0:
                return
            fd = os.dup(self._fd)  # our own handle: rotation may close the original while we fsync
            self._dirty = False
        try:
            os.fsync(fd)
        except OSError as e:
            self._dirty = True
            raise WALError(f"fsync of WAL {self.directory} failed: {e}") from e
        finally:
            os.close(fd)

    @property
    def dirty(self) -> bool:
        """Written since the last sync (a plain read: the fsync loop skips its thread hop while idle)."""
        return self._dirty

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def end_position(self) -> tuple[int, int]:
        """(segment first_seq, offset) just past the last fully written record: the limit for readers."""
        return self._end

    def segments(self) -> list[SegmentInfo]:
        out = []
        for first in _list_segments(self.directory):
            path = self.directory / segment_name(first)
            try:
                out.append(SegmentInfo(path, first, path.stat().st_size))
            except FileNotFoundError:  # deleted concurrently
                pass
        return out

    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments())

    def quarantined(self) -> list[Path]:
        """What recovery moved aside, this start or an earlier one (kept until someone removes it)."""
        try:
            return sorted(self.directory / QUARANTINE_DIR / n for n in os.listdir(self.directory / QUARANTINE_DIR))
        except FileNotFoundError:
            return []

    @property
    def active_first_seq(self) -> int:
        """The first seq of the live segment (the one appends go to, never deleted)."""
        return self._seg

    def delete_before(self, seq: int) -> list[Path]:
        """Delete the segments whose records all have seqs < ``seq``; never the live one."""
        active = self._seg
        segs = _list_segments(self.directory)
        deleted: list[Path] = []
        for cur, nxt in zip(segs, segs[1:]):
            if nxt > seq or cur >= active:
                break
            path = self.directory / segment_name(cur)
            path.unlink(missing_ok=True)
            deleted.append(path)
        if deleted:
            fsync_dir(self.directory)
        return deleted

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                try:
                    if self._dirty and self._fsync_mode != "never":
                        os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1

    def __enter__(self) -> WAL:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class WALReader:
    """Reads events from a cursor; may run while a writer appends (pass ``limit=wal.end_position``)."""

    def __init__(self, directory: str | os.PathLike[str], limit: Callable[[], tuple[int, int]] | None = None) -> None:
        self.directory = Path(directory)
        self._limit = limit
        self.corrupt_records = 0
        self._fd = -1
        self._fd_seg = -1
        self._segs: list[int] | None = None  # the last listing (a live WAL only grows at its end)

    def _segments(self, limit: tuple[int, int] | None) -> list[int]:
        """The segments, listed again only when the writer's segment is past the last listing (a live WAL:
        the agent's sinks read every few milliseconds) or without a writer's limit (a copied WAL)."""
        segs = self._segs
        if limit is None or not segs or segs[-1] < limit[0]:
            segs = self._segs = _list_segments(self.directory)
        return segs

    def _open(self, seg: int) -> int:
        if self._fd_seg != seg:
            self.close()
            # O_NONBLOCK: a FIFO put here under a segment's name must not hang the reader in open()
            self._fd = os.open(self.directory / segment_name(seg), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._fd_seg = seg
        return self._fd

    def _resolve(self, cursor: WalCursor, segs: list[int]) -> tuple[int, int]:
        """(segment, offset) to start from: the cursor's own, or (deleted / start cursor) the one holding seq."""
        if cursor.offset >= _HDR and cursor.segment in segs:
            return cursor.segment, cursor.offset
        i = bisect.bisect_right(segs, cursor.seq) - 1
        return segs[max(i, 0)], _HDR

    def _items(self, fd: int, off: int, end: int) -> Iterator[tuple[int, Record | Gap]]:
        """``scan`` over a sliding window of the file; yields (absolute offset, item)."""
        base, want = off, _CHUNK
        while base < end:
            buf = os.pread(fd, min(want, end - base), base)
            if len(buf) < min(want, end - base):  # file shorter than expected: scan what is there
                end = base + len(buf)
            complete = base + len(buf) >= end
            for item in scan(buf, 0, len(buf)):
                if isinstance(item, Gap) and item.tail and not complete:
                    # Window edge or damage needing more context: refetch from here, bigger if stuck.
                    want = want * 4 if item.offset == 0 else _CHUNK
                    base += item.offset
                    break
                yield base + item.offset, item
            else:
                if complete:
                    return
                base += len(buf)

    def read(
        self, cursor: WalCursor, max_events: int = 1000, max_bytes: int = 8 << 20
    ) -> tuple[list[tuple[int, memoryview]], WalCursor]:
        """Up to ``max_events`` (seq, payload) pairs from ``cursor`` on, and the cursor to resume from.

        ``max_bytes`` bounds the framed size (payload + length + padding) of a batch; at least one event is
        returned when one is available. Payloads are views into a read buffer: copy what you keep long.
        """
        out: list[tuple[int, memoryview]] = []
        limit = self._limit() if self._limit is not None else None  # before listing: its segment then exists
        cached = self._segs
        segs = self._segments(limit)
        if not segs or max_events <= 0:
            return out, cursor
        seg, off = self._resolve(cursor, segs)
        seq, nbytes = cursor.seq, 0
        while limit is None or seg <= limit[0]:
            try:
                fd = self._open(seg)
            except FileNotFoundError:  # deleted under us (retention): the next read lists and resolves by seq
                self._segs = None
                if not out and segs is cached:  # a stale listing: list again once, now
                    return self.read(cursor, max_events, max_bytes)
                break
            i = bisect.bisect_right(segs, seg)
            later = segs[i] if i < len(segs) else None
            if limit is not None and seg == limit[0]:
                end, live = limit[1], False
            else:
                # Segments were listed before this fstat: if a later one existed, this file was complete.
                end, live = os.fstat(fd).st_size, later is None and limit is None
            full = False
            for at, item in self._items(fd, off, end):
                if isinstance(item, Gap):
                    if item.tail and live:
                        break  # possibly a record still being written: "nothing more yet"
                    self.corrupt_records += 1
                    off = at + item.length
                    continue
                last = item.first_seq + item.count
                if last <= seq:  # already delivered
                    off = at + item.size
                    continue
                s = max(seq, item.first_seq)  # seqs may jump over a skipped corrupt record
                mark = len(out)
                frames = islice(iter_frames(item.frames), s - item.first_seq, item.count)
                try:
                    if len(out) + last - s <= max_events and nbytes + len(item.frames) <= max_bytes:
                        # Whole rest of the record fits: no per-frame budget checks (the reader's hot path).
                        out.extend(zip(range(s, last), frames))
                        s, nbytes = last, nbytes + len(item.frames)
                        full = len(out) >= max_events or nbytes >= max_bytes
                    else:
                        for p in frames:
                            out.append((s, p))
                            s += 1
                            nbytes += (len(p) + 11) & ~7
                            if len(out) >= max_events or nbytes >= max_bytes:
                                full = True
                                break
                except ProtocolError:  # CRC good but frames malformed: a writer bug; treat as corrupt
                    del out[mark:]
                    self.corrupt_records += 1
                    full = False
                    s = last
                if s >= last or not full:
                    seq, off = last, at + item.size
                else:
                    seq, off = s, at  # batch ended mid-record: resume at this record, seq advanced
                if full:
                    break
            else:
                if later is not None and (limit is None or seg < limit[0]):
                    seg, off = later, _HDR
                    continue
            break
        return out, WalCursor(seg, off, seq)

    def backlog(self, cursor: WalCursor, next_seq: int | None = None) -> tuple[int, int]:
        """(events, bytes) not yet read; events needs the writer's ``next_seq`` (else -1)."""
        events = max(0, next_seq - cursor.seq) if next_seq is not None else -1
        limit = self._limit() if self._limit is not None else None
        segs = _list_segments(self.directory)
        if not segs:
            return events, 0
        seg, off = self._resolve(cursor, segs)
        total = 0
        for first in segs[bisect.bisect_left(segs, seg) :]:
            if limit is not None and first > limit[0]:
                break
            if limit is not None and first == limit[0]:
                size = limit[1]
            else:
                try:
                    size = (self.directory / segment_name(first)).stat().st_size
                except FileNotFoundError:
                    continue
            total += max(0, size - off) if first == seg else size
        return events, total

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._fd_seg = -1, -1

    def __enter__(self) -> WALReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def inspect_wal(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read-only report of a WAL directory (for ``flightlog wal inspect``); never modifies a file.

    A segment that cannot be read is reported with its ``error``; so is each file recovery moved into
    ``quarantine/`` (under ``quarantined``), so that one bad file never hides the others."""
    d = Path(directory)
    if not d.is_dir():
        raise WALError(f"{d}: not a WAL directory (it does not exist or is a file); pass the agent's WAL directory")
    names = sorted(n for n in os.listdir(d) if n.endswith(".wal"))
    for n in names:
        if not _is_segment_name(n):
            raise WALError(f"{d / n}: not a WAL segment name (want 20 digits + .wal); move it out of {d}")
    segments = [_inspect_segment(d / name, int(name[:20]), i == len(names) - 1) for i, name in enumerate(names)]
    good = [s for s in segments if s["error"] is None]
    last_seqs = [s["last_seq"] for s in good if s["last_seq"] is not None]
    qdir = d / QUARANTINE_DIR
    quarantined = [_inspect_quarantined(qdir / n) for n in sorted(os.listdir(qdir))] if qdir.is_dir() else []
    totals = {
        "segments": len(good),
        "records": sum(s["records"] for s in good),
        "events": sum(s["events"] for s in good),
        "bytes": sum(s["bytes"] for s in segments),
        "corrupt_records": sum(len(s["corrupt"]) for s in good),
        "corrupt_bytes": sum(c["length"] for s in good for c in s["corrupt"]),
        "torn_tail_bytes": sum(s["torn_tail_bytes"] for s in good),
        "first_seq": good[0]["first_seq"] if good else None,
        "last_seq": max(last_seqs) if last_seqs else None,
        "bad_segments": len(segments) - len(good),
        "quarantined_segments": len(quarantined),
    }
    return {"directory": str(d), "segments": segments, "totals": totals, "quarantined": quarantined}


def _inspect_segment(path: Path, first: int, is_last: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": path.name, "first_seq": first, "last_seq": None, "schema_version": None,
                           "created_ns": None, "records": 0, "events": 0, "bytes": os.lstat(path).st_size,
                           "producers": {}, "corrupt": [], "torn_tail_bytes": 0, "error": None}
    if is_last and _torn_creation(path):
        # Crash while creating it: recovery deletes it; report it as a torn tail, not an error.
        out["torn_tail_bytes"] = out["bytes"]
        return out
    got = _load_segment(path, first)
    if got.problem or got.header is None or got.buf is None:
        out["error"] = f"{got.problem}; the agent moves it to {QUARANTINE_DIR}/ when it starts"
        return out
    hdr, buf = got.header, got.buf
    producers: dict[str, int] = out["producers"]
    for item in scan(buf, _HDR, len(buf)):
        if isinstance(item, Record):
            out["records"] += 1
            out["events"] += item.count
            producers[item.producer_id] = producers.get(item.producer_id, 0) + item.count
            if item.count:
                out["last_seq"] = item.first_seq + item.count - 1
        elif item.tail and is_last:
            out["torn_tail_bytes"] = item.length  # what the writer's recovery would cut off
        else:
            out["corrupt"].append({"offset": item.offset, "length": item.length, "reason": item.reason})
    out.update(schema_version=hdr.schema_version, created_ns=hdr.created_ns)
    return out


def _inspect_quarantined(path: Path) -> dict[str, Any]:
    """A file recovery moved aside, and why it could not be read (worked out again: nothing is trusted)."""
    name = path.name
    reason = "not a segment name"
    if len(name) >= 24 and name[:20].isdigit() and name[20:24] == ".wal":
        reason = _load_segment(path, int(name[:20])).problem or "readable now (restored by hand?)"
    return {"name": name, "path": str(path), "bytes": os.lstat(path).st_size, "reason": reason}
