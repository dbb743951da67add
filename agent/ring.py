"""The consumer side of the shared-memory ring (layout in ``flightlog.proto.ring``): the agent's view of a
producer's ring file, and the spans of frames between two cursor words."""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from flightlog.proto.errors import RingError
from flightlog.proto.frames import PAD_MARKER, U32
from flightlog.proto.osutil import process_alive
from flightlog.proto.ring import (
    BYTE_BITS,
    BYTE_MASK,
    HEADER_SIZE,
    LAYOUT_VERSION,
    OFF_CLOSED,
    OFF_CONSUMED_GEN,
    OFF_CONSUMED_OFF,
    OFF_DROPPED,
    OFF_ENDED,
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
    RING_MAGIC,
    cursor_distance,
    pack_cursor,
    read_header_str,
)

__all__ = ["RingView"]


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
        (self.pid_start,) = struct.unpack_from("<Q", mm, OFF_PID_START)
        self.producer_id = read_header_str(mm, OFF_PRODUCER_ID)
        self.run_id = _run_id(self.producer_id, mm)
        self.spill_dir = Path(read_header_str(mm, OFF_SPILL_DIR))
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
    def sleeping(self) -> int:
        """0 while the agent is awake; else the number of the sleep it is in (see ``flightlog.proto.ring``)."""
        return self._c[OFF_SLEEPING // 8]

    @sleeping.setter
    def sleeping(self, value: int) -> None:
        """Nonzero: ask the producer to ring the doorbell after its next publish (once per value)."""
        self._c[OFF_SLEEPING // 8] = value

    @property
    def pending(self) -> tuple[int, int]:
        """(frames, bytes) published by the producer and not yet consumed."""
        return cursor_distance(self.read_word, self.write_word)

    @property
    def closed(self) -> bool:
        return bool(self._c[OFF_CLOSED // 8])

    @property
    def ended(self) -> bool:
        """The producer wrote its run's RunEnd (a kill after that is not a crash)."""
        return bool(self._c[OFF_ENDED // 8])

    def producer_alive(self) -> bool:
        """True while the process that created the ring runs (a reused pid is told apart by its start time)."""
        return process_alive(self.pid, self.pid_start)

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

    def boundary(self, read_word: int, write_word: int, limit: int) -> int:
        """A cursor word at a frame boundary between the two words, at most ``limit`` bytes of frames past
        ``read_word`` (but at least one frame): where to cut a span too large for one WAL record.

        Walks the frame headers (only large backlogs are cut, so the common drain never walks). The
        padding frame before a wrap counts in the byte counter and not in the frame counter, as the
        producer counts it.
        """
        count, nbytes = cursor_distance(read_word, write_word)
        if nbytes <= limit:
            return write_word
        size = self.size
        pos = read_word & (size - 1)
        data = self.data
        unpack = U32.unpack_from
        walked = frames = payload = 0
        while walked < nbytes and frames < count:
            if pos == size:
                pos = 0
            (n,) = unpack(data, pos)
            if n == PAD_MARKER:
                walked += size - pos
                pos = size
                continue
            stride = (n + 11) & ~7
            if frames and payload + stride > limit:
                break
            if walked + stride > nbytes:
                raise RingError(f"ring {self.path}: a frame of {n} bytes at byte {pos} runs past the write cursor")
            walked += stride
            payload += stride
            pos += stride
            frames += 1
        if walked >= nbytes:
            return write_word  # the producer's own word: its frame field may run past FRAME_MASK unmasked
        r_frames, r_bytes = read_word >> BYTE_BITS, read_word & BYTE_MASK
        return pack_cursor(r_frames + frames, r_bytes + walked)

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


def _run_id(producer_id: str, mm: mmap.mmap) -> str:
    """The run the ring's producer logs: from the header; for a ring of an older SDK (no run id there), from
    its producer id, ``<run id>-<pid>-<random>`` with ``-side`` after it for a side ring."""
    try:
        recorded = read_header_str(mm, OFF_RUN_ID)
    except UnicodeDecodeError:
        recorded = ""
    if recorded and producer_id.startswith(recorded + "-"):
        return recorded
    base = producer_id[: -len("-side")] if producer_id.endswith("-side") else producer_id
    parts = base.rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[0] and parts[1].isdigit() else producer_id
