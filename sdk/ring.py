"""The producer side of a single-producer/single-consumer ring in shared memory, plus spill files.

Layout (one file in /dev/shm): a 4096-byte header, then a power-of-two data area. Each cursor is one u64
word on its own cache line packing a frame counter (high 29 bits, counted modulo 2**28) and a byte counter
(low 35 bits, modulo 2**35): the agent learns how many frames a span holds without walking them, so ingest
is a memcpy and a CRC. The producer copies a frame in, then publishes the write word with one aligned 8-byte store; the
agent publishes the read word only after the frames are in its WAL. On x86-64 stores become visible in program order, so no lock, no syscall and no thread is
needed; elsewhere the SDK falls back to the control socket (see ``ring_supported``).
"""
from __future__ import annotations

import logging
import mmap
import os
import platform
import struct
import time
from pathlib import Path
from typing import Any

from flightlog.proto.errors import RingError
from flightlog.proto.events import SCHEMA_VERSION
from flightlog.proto.frames import PAD_MARKER

__all__ = [
    "RingProducer", "RingView", "HEADER_SIZE", "RING_MAGIC", "ring_supported", "spill_path",
    "pack_cursor", "unpack_cursor", "cursor_distance", "cursor_reached",
]

RING_MAGIC = b"FLRING01"
HEADER_SIZE = 4096

# Header offsets. Producer-owned and consumer-owned fields sit on different cache lines.
OFF_MAGIC = 0  # 8 bytes
OFF_VERSION = 8  # u32 layout version, u32 schema version
OFF_SIZE = 16  # u64 data size
OFF_PID = 24  # u32 pid, i32 rank
OFF_CLOSED = 32  # u64: 1 once the producer finished cleanly
OFF_CREATED = 40  # u64 ns
OFF_WRITE = 64  # u64 write cursor (producer)
OFF_READ = 128  # u64 read cursor (consumer)
OFF_SPILL_GEN = 192  # u64 newest spill generation the producer opened (producer)
OFF_DROPPED = 200  # u64 events dropped by policy "drop" (producer)
OFF_SPILLED = 208  # u64 events written to spill files (producer)
OFF_PAD = 216  # u64 byte counter (mod 2**36) where the newest padding frame starts (producer)
OFF_CONSUMED_OFF = 256  # u64 bytes of the current spill generation the agent has made durable (consumer)
OFF_CONSUMED_GEN = 264  # u64 spill generation the agent is reading (consumer)
OFF_PRODUCER_ID = 512  # u16 length + utf-8
OFF_SPILL_DIR = 1024  # u16 length + utf-8
LAYOUT_VERSION = 1

BYTE_BITS = 35
BYTE_MASK = (1 << BYTE_BITS) - 1  # rings are at most 1 GiB, so spans never reach 2**34
FRAME_MASK = (1 << 28) - 1  # frames are counted modulo 2**28; at most 2**27 (8 bytes each) fit in 1 GiB
_FRAME_ONE = 1 << BYTE_BITS
# The producer adds ``stride + _FRAME_ONE`` to its word on the fast path (two small additions instead of
# shifts and masks) and renormalises in the slow path, which runs at least once per lap of the ring: so the
# byte field never carries (the fast path never reaches the physical end) and the frame field stays below
# 2**28 + 2**27, inside its 29 bits.

_U64 = struct.Struct("=Q")  # native: pack_into is a single 8-byte store, no byte-by-byte loop
_U16 = struct.Struct("<H")
_HDR = struct.Struct("<I")


def pack_cursor(frames: int, nbytes: int) -> int:
    return ((frames & FRAME_MASK) << BYTE_BITS) | (nbytes & BYTE_MASK)


def unpack_cursor(word: int) -> tuple[int, int]:
    return (word >> BYTE_BITS) & FRAME_MASK, word & BYTE_MASK


def cursor_distance(older: int, newer: int) -> tuple[int, int]:
    """(frames, bytes) from cursor word ``older`` to ``newer``, modular."""
    return ((newer >> BYTE_BITS) - (older >> BYTE_BITS)) & FRAME_MASK, ((newer - older) & BYTE_MASK)


def cursor_reached(read_word: int, target_bytes: int) -> bool:
    """True when the read cursor is at or past ``target_bytes`` (a producer byte counter)."""
    d = (target_bytes - read_word) & BYTE_MASK
    return d == 0 or d >= 1 << (BYTE_BITS - 1)


def ring_supported() -> bool:
    """True where plain stores are seen in program order by other cores (x86-64's TSO).

    ``FLIGHTLOG_TRANSPORT=socket`` forces the socket fallback (used by its tests on x86-64).
    """
    if os.environ.get("FLIGHTLOG_TRANSPORT") == "socket":
        return False
    return platform.machine().lower() in ("x86_64", "amd64")


def spill_path(spill_dir: str | os.PathLike[str], producer_id: str, gen: int) -> Path:
    return Path(spill_dir) / f"{producer_id}.{gen}.spill"


def _write_str(mm: mmap.mmap, off: int, value: str, limit: int) -> None:
    raw = value.encode()
    if len(raw) > limit - 2:
        raise RingError(f"ring header field too long ({len(raw)} bytes): {value!r}")
    _U16.pack_into(mm, off, len(raw))
    mm[off + 2 : off + 2 + len(raw)] = raw


def _read_str(mm: mmap.mmap, off: int) -> str:
    (n,) = _U16.unpack_from(mm, off)
    return bytes(mm[off + 2 : off + 2 + n]).decode()


class RingProducer:
    """One producer's ring. Not thread-safe: give each logging thread its own producer."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int,
        producer_id: str,
        spill_dir: str | os.PathLike[str],
        *,
        rank: int = 0,
        on_full: str = "spill",
        block_timeout: float = 5.0,
    ) -> None:
        if size & (size - 1) or size < 4096 or size > 1 << 30:
            raise RingError(f"ring size must be a power of two from 4 KiB to 1 GiB, got {size}")
        self.path = Path(path)
        self.size = size
        self.producer_id = producer_id
        self.spill_dir = Path(spill_dir)
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER_SIZE + size)
            self._mm = mmap.mmap(fd, HEADER_SIZE + size)
        finally:
            os.close(fd)
        mm = self._mm
        # Pre-fault every page now so the first log calls do not pay for page faults.
        zero = bytes(1 << 16)
        for off in range(0, HEADER_SIZE + size, len(zero)):
            end = min(off + len(zero), HEADER_SIZE + size)
            mm[off:end] = zero[: end - off]
        struct.pack_into("<II", mm, OFF_VERSION, LAYOUT_VERSION, SCHEMA_VERSION)
        struct.pack_into("<Q", mm, OFF_SIZE, size)
        struct.pack_into("<Ii", mm, OFF_PID, os.getpid(), rank)
        struct.pack_into("<Q", mm, OFF_CREATED, time.time_ns())
        _write_str(mm, OFF_PRODUCER_ID, producer_id, 512)
        _write_str(mm, OFF_SPILL_DIR, str(self.spill_dir), 3072)
        mm[OFF_MAGIC : OFF_MAGIC + 8] = RING_MAGIC  # last: the agent ignores rings without magic
        self._view = memoryview(mm)
        self._data = self._view[HEADER_SIZE:]
        self._data32 = self._data.cast("I")  # frame headers: one native u32 store
        self._cursors = self._view[:HEADER_SIZE].cast("Q")  # native u64 stores
        self._w = 0  # bytes written (unbounded here)
        self._word = 0  # the published write word (see pack_cursor)
        self._free_until = size  # cached: write cursor may reach this without re-reading the read cursor
        self._limit = size - 1  # see _update_limit
        self._mask = size - 1
        self._spill_fd = -1
        self._spill_gen = 0
        self._spill_size = 0
        self.dropped = 0
        self.spilled = 0

    # --- the hot path --------------------------------------------------------------------------

    def write_frame(self, payload: bytearray | bytes, _one: int = _FRAME_ONE, _w_index: int = OFF_WRITE // 8) -> None:
        """Write one frame: ``u32 length`` then ``payload``, padded to 8 bytes; then publish it.

        The keyword defaults bind constants as fast locals: this is the hot path of every log call.
        """
        n = len(payload)
        stride = (n + 11) & ~7
        w = self._w
        if w + stride > self._limit:
            # Full, wrapping, or spilling: one comparison keeps all of that off the common path.
            self._write_slow(payload, stride)
            return
        pos = w & self._mask
        self._data[pos + 4 : pos + 4 + n] = payload
        self._data32[pos >> 2] = n
        self._w = w + stride
        self._word = word = self._word + stride + _one
        self._cursors[_w_index] = word  # publish: one aligned 8-byte store, after the copy

    # --- slow paths ----------------------------------------------------------------------------

    def _update_limit(self) -> None:
        """The byte counter up to which frames go in without a check: free space, and the physical end."""
        w = self._w
        end = w - (w & self._mask) + self.size
        # end - 1: a frame that reaches the physical end exactly takes the slow path (see _FRAME_ONE).
        self._limit = -1 if self._spill_fd >= 0 else min(self._free_until, end - 1)

    def _write_slow(self, payload: bytearray | bytes, stride: int) -> None:
        if self._spill_fd >= 0 and not self._leave_spill():
            self._spill(payload, stride)
            self._update_limit()
            return
        w = self._w
        pos = w & self._mask
        wrap = self.size - pos if pos + stride > self.size else 0
        if w + wrap + stride > self._free_until:
            # Re-read the consumer's cursor only when the cached bound says we might be full.
            self._refresh_free()
            if w + wrap + stride > self._free_until and not self._wait_or_spill(payload, stride, wrap):
                self._update_limit()
                return
        if wrap:
            _HDR.pack_into(self._data, pos, PAD_MARKER)
            self._cursors[OFF_PAD // 8] = w & BYTE_MASK
            w += wrap
            pos = 0
        n = len(payload)
        self._data[pos + 4 : pos + 4 + n] = payload
        self._data32[pos >> 2] = n
        self._w = w = w + stride
        frames = ((self._word >> BYTE_BITS) + 1) & FRAME_MASK
        self._word = word = (frames << BYTE_BITS) | (w & BYTE_MASK)
        self._cursors[OFF_WRITE // 8] = word
        self._refresh_free()
        self._update_limit()

    def _refresh_free(self) -> None:
        read_bytes = self._cursors[OFF_READ // 8] & BYTE_MASK
        behind = (self._w - read_bytes) & BYTE_MASK  # bytes the agent has not consumed yet
        self._free_until = self._w - behind + self.size

    def _wait_or_spill(self, buf: bytearray | bytes, stride: int, wrap: int) -> bool:
        """Ring full. Returns True if the frame may now go into the ring."""
        if stride + wrap > self.size:
            # Larger than the whole ring: can only go through a spill file.
            self._spill(buf, stride)
            return False
        if self.on_full == "block":
            deadline = time.monotonic() + self.block_timeout
            while time.monotonic() < deadline:
                time.sleep(0.0005)
                self._refresh_free()
                if self._w + wrap + stride <= self._free_until:
                    return True
            self._drop()
            return False
        if self.on_full == "drop":
            self._drop()
            return False
        self._spill(buf, stride)
        return False

    def _drop(self) -> None:
        self.dropped += 1
        self._cursors[OFF_DROPPED // 8] = self.dropped

    def _spill(self, payload: bytearray | bytes, stride: int) -> None:
        if self._spill_fd < 0:
            self._spill_gen += 1
            self._spill_size = 0
            self.spill_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = spill_path(self.spill_dir, self.producer_id, self._spill_gen)
            try:
                self._spill_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as exc:
                self._spill_gen -= 1
                self._spill_failed(path, exc)
                return
            # Published after the ring frames before it: the agent drains the ring before the spill.
            self._cursors[OFF_SPILL_GEN // 8] = self._spill_gen
        frame = _HDR.pack(len(payload)) + bytes(payload) + bytes(stride - 4 - len(payload))
        try:
            written = os.write(self._spill_fd, frame)
        except OSError as exc:
            written, error = 0, exc
        else:
            error = None
        if written != len(frame):
            if written:  # a torn frame: cut it so the agent never reads half of it
                os.ftruncate(self._spill_fd, self._spill_size)
            self._spill_failed(spill_path(self.spill_dir, self.producer_id, self._spill_gen),
                              error or OSError(f"short write ({written} of {len(frame)} bytes)"))
            return
        self._spill_size += stride
        self.spilled += 1
        self._cursors[OFF_SPILLED // 8] = self.spilled

    def _spill_failed(self, path: Path, exc: OSError) -> None:
        """Ring full and the spill file unwritable (disk full): the event is dropped and counted, never
        raised into the training loop; the count is reported at finish."""
        self._drop()
        if self.dropped == 1 or self.dropped % 10000 == 0:
            logging.getLogger("flightlog").error(
                "flightlog: ring %s is full and spill file %s cannot be written (%s): %d events dropped so far; "
                "free disk space or check that the agent runs (flightlog status)", self.path, path, exc,
                self.dropped)

    def _leave_spill(self) -> bool:
        """While spilling: go back to the ring once the agent has made the whole spill file durable."""
        gen = self._cursors[OFF_CONSUMED_GEN // 8]
        off = self._cursors[OFF_CONSUMED_OFF // 8]
        if gen == self._spill_gen and off == self._spill_size:
            os.close(self._spill_fd)
            self._spill_fd = -1
            self._refresh_free()
            return True
        return False

    # --- positions, for flush ------------------------------------------------------------------

    def positions(self) -> tuple[int, int, int]:
        """(ring bytes written, spill generation, spill bytes written) for a flush request."""
        return self._w, self._spill_gen, self._spill_size if self._spill_fd >= 0 else 0

    def close(self, *, unlink: bool = False) -> None:
        """Mark the ring finished (the agent deletes it once drained)."""
        if self._spill_fd >= 0:
            os.close(self._spill_fd)
            self._spill_fd = -1
        if self._view is None:
            return
        self._cursors[OFF_CLOSED // 8] = 1
        self._cursors.release()
        self._data32.release()
        self._data.release()
        self._view.release()
        self._view = None  # type: ignore[assignment]
        self._mm.close()
        if unlink:
            self.path.unlink(missing_ok=True)


class RingView:
    """The consumer's view of a ring file (used by the agent; also by tests)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_SIZE:
                raise RingError(f"{self.path} is not a flightlog ring (only {st.st_size} bytes)")
            self._mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        mm = self._mm
        if mm[0:8] != RING_MAGIC:
            self._mm.close()
            raise RingError(f"{self.path} is not a flightlog ring (bad magic); remove it if stale")
        layout, schema = struct.unpack_from("<II", mm, OFF_VERSION)
        if layout != LAYOUT_VERSION:
            self._mm.close()
            raise RingError(f"{self.path} has ring layout {layout}, this agent reads {LAYOUT_VERSION}")
        self.schema = schema
        (self.size,) = struct.unpack_from("<Q", mm, OFF_SIZE)
        if st.st_size != HEADER_SIZE + self.size:
            self._mm.close()
            raise RingError(f"{self.path} size does not match its header; remove the stale ring")
        self.pid, self.rank = struct.unpack_from("<Ii", mm, OFF_PID)
        self.producer_id = _read_str(mm, OFF_PRODUCER_ID)
        self.spill_dir = Path(_read_str(mm, OFF_SPILL_DIR))
        self._view = memoryview(mm)
        self.data = self._view[HEADER_SIZE:]
        self._c = self._view[:HEADER_SIZE].cast("Q")

    @property
    def write_word(self) -> int:
        return self._c[OFF_WRITE // 8]

    @property
    def read_word(self) -> int:
        return self._c[OFF_READ // 8]

    @read_word.setter
    def read_word(self, value: int) -> None:
        self._c[OFF_READ // 8] = value

    @property
    def pending(self) -> tuple[int, int]:
        """(frames, bytes) published by the producer and not yet consumed."""
        return cursor_distance(self.read_word, self.write_word)

    @property
    def closed(self) -> bool:
        return bool(self._c[OFF_CLOSED // 8])

    @property
    def spill_gen(self) -> int:
        return self._c[OFF_SPILL_GEN // 8]

    @property
    def dropped(self) -> int:
        return self._c[OFF_DROPPED // 8]

    @property
    def spilled(self) -> int:
        return self._c[OFF_SPILLED // 8]

    @property
    def consumed(self) -> tuple[int, int]:
        return self._c[OFF_CONSUMED_GEN // 8], self._c[OFF_CONSUMED_OFF // 8]

    def set_consumed(self, gen: int, offset: int) -> None:
        # Offset before generation: a producer that sees the new generation also sees its offset.
        if gen != self._c[OFF_CONSUMED_GEN // 8]:
            self._c[OFF_CONSUMED_OFF // 8] = 0
            self._c[OFF_CONSUMED_GEN // 8] = gen
        self._c[OFF_CONSUMED_OFF // 8] = offset

    def take(self, read_word: int, write_word: int) -> tuple[bytes | memoryview, int, int] | None:
        """The frames between two cursor words: (frames bytes, frame count, read word after).

        No frame is walked: the count comes from the cursor words, and a padding frame is cut out using
        the position the producer recorded (at most one wrap lies between the cursors).
        """
        count, nbytes = cursor_distance(read_word, write_word)
        if not nbytes:
            return None
        size = self.size
        pos = read_word & (size - 1)
        if pos + nbytes <= size:
            return self.data[pos : pos + nbytes], count, write_word
        pad = self._c[OFF_PAD // 8]
        pad_offset = (pad - read_word) & BYTE_MASK  # bytes from the read cursor to the padding frame
        if pad_offset < nbytes:
            head = self.data[pos : pos + pad_offset]
            skipped = size - pos - pad_offset
        else:  # the frame before the wrap ended exactly at the end: no padding frame
            head = self.data[pos:size]
            skipped = 0
        tail_len = nbytes - len(head) - skipped
        if tail_len < 0 or len(head) + skipped != size - pos:
            raise RingError(f"ring {self.path}: inconsistent padding record at byte {pad}")
        return bytes(head) + bytes(self.data[0:tail_len]), count, write_word

    def close(self) -> None:
        self._c.release()
        self.data.release()
        self._view.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # a slice handed out by take() is still referenced (e.g. by a traceback); GC unmaps it
