"""The producer side of the shared-memory ring (see ``flightlog.proto.ring`` for the layout), plus spill files."""
from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import time
from pathlib import Path

from flightlog.proto.errors import RingError
from flightlog.proto.events import SCHEMA_VERSION
from flightlog.proto.frames import MAX_EVENT_BYTES, PAD_MARKER, check_event_size
from flightlog.proto.osutil import process_start_ticks
from flightlog.proto.paths import DOORBELL_NAME
from flightlog.proto.ring import (
    _FRAME_ONE,
    _HDR,
    BYTE_BITS,
    BYTE_MASK,
    FRAME_MASK,
    HEADER_SIZE,
    LAYOUT_VERSION,
    OFF_CLOSED,
    OFF_CONSUMED_GEN,
    OFF_CONSUMED_OFF,
    OFF_CREATED,
    OFF_DROPPED,
    OFF_ENDED,
    OFF_MAGIC,
    OFF_PAD,
    OFF_PID,
    OFF_PID_START,
    OFF_PRODUCER_ID,
    OFF_READ,
    OFF_RUN_ID,
    OFF_SIZE,
    OFF_SLEEPING,
    OFF_SPILL_DIR,
    OFF_SPILL_GEN,
    OFF_SPILLED,
    OFF_VERSION,
    OFF_WRITE,
    PRODUCER_ID_LIMIT,
    RING_MAGIC,
    RUN_ID_LIMIT,
    ring_supported,
    spill_path,
    write_header_str,
)

__all__ = ["RingProducer", "ring_supported"]


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
        doorbell: str | os.PathLike[str] | None = None,
        run_id: str = "",
    ) -> None:
        if size & (size - 1) or size < 4096 or size > 1 << 30:
            raise RingError(f"ring size must be a power of two from 4 KiB to 1 GiB, got {size}")
        self.path = Path(path)
        self.size = size
        self.producer_id = producer_id
        self.spill_dir = Path(spill_dir)
        self.on_full = on_full
        self.block_timeout = block_timeout
        # The agent's doorbell lives next to the rings (AgentPaths.doorbell): derived from the ring's folder.
        self._bell_path = str(doorbell) if doorbell is not None else str(self.path.parent / DOORBELL_NAME)
        self._bell: socket.socket | None = None
        self._rang_for = 0  # the agent's sleep this producer rang for: once per sleep is enough
        fd = self._create()
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
        struct.pack_into("<Q", mm, OFF_PID_START, process_start_ticks(os.getpid()))
        write_header_str(mm, OFF_PRODUCER_ID, producer_id, PRODUCER_ID_LIMIT)
        write_header_str(mm, OFF_RUN_ID, run_id, RUN_ID_LIMIT)
        write_header_str(mm, OFF_SPILL_DIR, str(self.spill_dir), 3072)
        mm[OFF_MAGIC : OFF_MAGIC + 8] = RING_MAGIC  # last: the agent ignores rings without magic
        self._view = memoryview(mm)
        self._data = self._view[HEADER_SIZE:]
        self._data32 = self._data.cast("I")  # frame headers: one native u32 store
        self._cursors = self._view[:HEADER_SIZE].cast("Q")  # native u64 stores
        self._w = 0  # bytes written (unbounded here)
        self._word = 0  # the published write word (see pack_cursor)
        self._free_until = size  # cached: write cursor may reach this without re-reading the read cursor
        self._limit = min(size - 1, MAX_EVENT_BYTES)  # see _update_limit
        self._mask = size - 1
        self._spill_fd = -1
        self._spill_gen = 0
        self._spill_size = 0
        self.dropped = 0
        self.spilled = 0

    def _create(self) -> int:
        """The ring file, created exclusively. An agent that exits removes the ring directory when it is empty:
        if that happens between the mkdir and the open, make the directory again."""
        for attempt in range(3):
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # --- the hot path --------------------------------------------------------------------------

    def write_frame(self, payload: bytearray | bytes, _one: int = _FRAME_ONE, _w_index: int = OFF_WRITE // 8,
                    _s_index: int = OFF_SLEEPING // 8) -> None:
        """Write one frame: ``u32 length`` then ``payload``, padded to 8 bytes; then publish it, and ring the
        agent's doorbell if it sleeps (rare: while it is awake the call makes no syscall).

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
        cursors = self._cursors
        cursors[_w_index] = word  # publish: one aligned 8-byte store, after the copy
        if cursors[_s_index]:  # read after the publish: see "Doorbell" in flightlog.proto.ring
            self._ring_bell()

    def _ring_bell(self) -> None:
        # Once per sleep: until the woken agent clears the word, every log call would otherwise ring again.
        sleep_no = self._cursors[OFF_SLEEPING // 8]
        if sleep_no == self._rang_for:
            return
        self._rang_for = sleep_no
        self._send_ring()

    def _send_ring(self) -> None:
        """One datagram to the agent's doorbell; never blocks and never fails the log call (no agent, or its
        socket buffer full because it has been rung already: either way there is nothing more to do; an agent
        killed asleep leaves its word set, and this producer rings for that sleep only once)."""
        bell = self._bell
        if bell is None:
            try:
                bell = self._bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError:
                return
            bell.setblocking(False)
        try:
            bell.sendto(b"\x01", self._bell_path)
        except OSError:
            pass

    # --- slow paths ----------------------------------------------------------------------------

    def _update_limit(self) -> None:
        """The byte counter up to which frames go in without a check: free space, the physical end, and
        MAX_EVENT_BYTES past the write cursor — so that a frame over the limit always takes the slow path,
        which refuses it, and the hot path needs no size check of its own."""
        w = self._w
        end = w - (w & self._mask) + self.size
        # end - 1: a frame that reaches the physical end exactly takes the slow path (see _FRAME_ONE).
        self._limit = -1 if self._spill_fd >= 0 else min(self._free_until, end - 1, w + MAX_EVENT_BYTES)

    def _write_slow(self, payload: bytearray | bytes, stride: int) -> None:
        check_event_size(payload)  # before anything is written: the event is refused at the call
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
        if self._cursors[OFF_SLEEPING // 8]:
            self._ring_bell()
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
                # O_NOFOLLOW: a symlink planted at this predictable name is refused, nothing written through it
                self._spill_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                                         0o600)
            except OSError as exc:
                self._spill_gen -= 1
                self._spill_failed(path, exc)
                return
            # Published after the ring frames before it: the agent drains the ring before the spill.
            self._cursors[OFF_SPILL_GEN // 8] = self._spill_gen
        frame = _HDR.pack(len(payload)) + bytes(payload) + bytes(stride - 4 - len(payload))
        error: OSError | None = None
        try:
            written = os.write(self._spill_fd, frame)
        except OSError as exc:
            written, error = 0, exc
        if written != len(frame):
            if written:  # a torn frame: cut it so the agent never reads half of it
                os.ftruncate(self._spill_fd, self._spill_size)
            self._spill_failed(spill_path(self.spill_dir, self.producer_id, self._spill_gen),
                              error or OSError(f"short write ({written} of {len(frame)} bytes)"))
            return
        self._spill_size += stride
        self.spilled += 1
        self._cursors[OFF_SPILLED // 8] = self.spilled
        if self._cursors[OFF_SLEEPING // 8]:
            self._ring_bell()

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

    def mark_ended(self) -> None:
        """The run's RunEnd is written (into this ring or its sibling): if this process dies from now on, the
        agent does not end the run as crashed. Any thread: one word of its own, after the frame's publish."""
        if self._view is not None:
            self._cursors[OFF_ENDED // 8] = 1

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
        if self._cursors[OFF_SLEEPING // 8]:
            self._ring_bell()  # the agent retires the ring now rather than at its next scan
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        self._cursors.release()
        self._data32.release()
        self._data.release()
        self._view.release()
        self._view = None  # type: ignore[assignment]
        self._mm.close()
        if unlink:
            self.path.unlink(missing_ok=True)
