"""Ingest: drain every producer's ring (and spill files) into the WAL, then advance its read cursor.

The read cursor moves only after the WAL append, so a crash of the agent re-reads at most what the WAL
already holds; on start, the positions recorded in the WAL records move each cursor past what is already
there, so nothing is ingested twice. A backlog larger than one record is cut at frame boundaries, each
record carrying the producer position after it. What drives the draining is ``ingest_loop``.

A producer that died without finish() (SIGKILL, SIGTERM, the OOM killer) is drained to the end, its ring
retired, and, when no other ring of its run is left, a ``RunEnd(status="crashed")`` goes into the WAL
after its last event, so every sink ends the run through the one delivery engine.
"""
from __future__ import annotations

import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flightlog.proto.codec import encode_event
from flightlog.proto.errors import ProtocolError, RingError
from flightlog.proto.events import CRASHED, RunEnd
from flightlog.proto.frames import PAD_MARKER, U32, append_frame
from flightlog.proto.ring import cursor_distance, cursor_reached, spill_path

from .ring import RingView
from .wal import SRC_INTERNAL, SRC_RING, SRC_SPILL
from .wal.format import MAX_RECORD_BYTES, RECORD_HEADER_SIZE

__all__ = ["SRC_RING", "SRC_SPILL", "Ingestor", "split_frames"]

log = logging.getLogger("flightlog.agent")
T = TypeVar("T")

_MAX_RECORD = 4 << 20  # bytes of frames per WAL record read from a spill file
#: Bytes of frames per WAL record cut from a ring backlog (the WAL refuses records over 256 MiB; a ring holds up
#: to 1 GiB). Large enough that any drain but a huge backlog's is one record and never walks its frames.
_MAX_RING_RECORD = 128 << 20
_SLEEP_NO_MAX = (1 << 62) - 1
#: The largest frame a spill file or ring may hold: a frame the WAL can still take as one record. The SDK
#: refuses events over MAX_EVENT_BYTES, far below this; a larger one (another writer's) is skipped, loudly.
_MAX_SPILL_FRAME = MAX_RECORD_BYTES - RECORD_HEADER_SIZE - 256
#: How often an idle ring's producer is checked for life (a kill and a read of /proc, not per drain).
LIVENESS_SECONDS = 1.0


def split_frames(buf: bytes | memoryview, limit: int = _MAX_RECORD) -> tuple[int, int]:
    """Complete frames at the start of ``buf``: (bytes, count), stopping before ``limit`` bytes.

    A frame header claiming more than the buffer holds is an incomplete tail (a writer mid-write).
    """
    end = len(buf)
    pos = 0
    count = 0
    unpack = U32.unpack_from
    while pos + 4 <= end:
        (n,) = unpack(buf, pos)
        if n == PAD_MARKER:
            raise ProtocolError(f"padding frame at byte {pos} of a spill file")
        stride = (n + 11) & ~7
        if pos + stride > end or (count and pos + stride > limit):
            break
        pos += stride
        count += 1
    return pos, count


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    """Hold the ring table's lock: drain and retire run on a worker thread while the control server's
    status and flush handlers read the same rings (a retired ring's memory is released)."""

    @functools.wraps(method)
    def wrapper(self: Ingestor, *args: Any, **kwargs: Any) -> T:
        with self._rings_lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class _Ring:
    view: RingView
    first_seen: float
    events: int = 0
    spilled_seen: int = 0  # the producer's spill counter when its spill files were last read to the end
    checked: float = -LIVENESS_SECONDS  # monotonic time its producer was last found alive


class Ingestor:
    """Owns the consumer side of every ring in ``ring_dir``.

    Thread-safe: the ring table is guarded by one lock (draining and retiring run on a worker thread while
    the control server reads the same rings), WAL appends by another that the agent's own events share.
    """

    def __init__(self, wal: Any, ring_dir: Path, positions: dict[tuple[str, int], tuple[int, int]] | None = None,
                 *, lock: threading.Lock | None = None) -> None:
        self.wal = wal
        self._lock = lock or threading.Lock()  # around WAL appends (shared with the agent's own events)
        self._rings_lock = threading.RLock()  # see _locked
        self.ring_dir = Path(ring_dir)
        self.rings: dict[str, _Ring] = {}
        self._positions = dict(positions or {})
        self.events_total = 0
        self.bad_rings: set[str] = set()
        # The runs whose events reached the WAL since take_drained_runs (None: unknown, wake every sink).
        self._drained_runs: set[str] | None = set()
        # Sleep numbers start at random: a producer that rang for a dead agent's sleep rings for ours too.
        self._sleep_no = secrets.randbits(62)

    # --- discovery -----------------------------------------------------------------------------

    @_locked
    def scan(self) -> None:
        """Open rings that appeared in the ring directory since the last scan."""
        try:
            names = os.listdir(self.ring_dir)
        except FileNotFoundError:
            return
        for name in names:
            if not name.endswith(".ring") or name in self.rings or name in self.bad_rings:
                continue
            try:
                view = RingView(self.ring_dir / name)
            except (RingError, OSError, ValueError) as exc:
                # A ring still being created has no magic yet; try again on the next scan.
                if time.time() - _mtime(self.ring_dir / name) > 30:
                    log.warning("ignoring %s: %s", name, exc)
                    self.bad_rings.add(name)
                continue
            self._resume(view)
            self.rings[name] = _Ring(view, time.monotonic())

    def _resume(self, view: RingView) -> None:
        """Move cursors past what the WAL already holds (a crash between WAL append and cursor store)."""
        pid = view.producer_id
        ring_pos = self._positions.get((pid, SRC_RING))
        if ring_pos is not None:
            recorded = ring_pos[1]
            _, ahead = cursor_distance(view.read_word, recorded)
            if 0 < ahead < 1 << 35:  # the WAL already holds frames the read word does not count yet
                view.read_word = recorded
        spill_pos = self._positions.get((pid, SRC_SPILL))
        if spill_pos is not None and spill_pos > view.consumed:
            view.set_consumed(*spill_pos)

    # --- draining ------------------------------------------------------------------------------

    def _append(self, frames: Any, count: int, producer_id: str, kind: int, gen: int, end: int) -> None:
        with self._lock:
            self.wal.append(frames, count, producer_id, kind, gen, end)

    def append_batch(self, frames: Any, count: int, producer_id: str) -> None:
        """Frames that came over the control socket (the fallback where rings are not safe): into the
        WAL as they are, counted with the rest."""
        self._append(frames, count, producer_id, SRC_INTERNAL, 0, 0)
        self.events_total += count
        with self._rings_lock:
            self._drained_runs = None  # a socket batch's runs are not looked at: every sink has a look

    @_locked
    def drain(self) -> int:
        """One pass over every ring; returns the number of events made durable-in-WAL."""
        total = 0
        for name in list(self.rings):
            ring = self.rings[name]
            try:
                n = self._drain_ring(ring)
            except (ProtocolError, RingError) as exc:
                log.error("ring %s is corrupt (%s); it is skipped from now on", name, exc)
                ring.view.close()
                del self.rings[name]
                self.bad_rings.add(name)
                continue
            ring.events += n
            total += n
            if n:
                self._note_run(ring.view.run_id)
            else:
                total += self._maybe_retire(name, ring)
        self.events_total += total
        return total

    def _note_run(self, run_id: str) -> None:
        if self._drained_runs is not None:
            self._drained_runs.add(run_id)

    def take_drained_runs(self) -> set[str] | None:
        """The runs whose events reached the WAL since the last call (None: not known; any run may have):
        the agent wakes only the sinks that serve one of them, or may (``SinkRunner.wake``)."""
        with self._rings_lock:
            runs, self._drained_runs = self._drained_runs, set()
        return runs

    def _drain_ring(self, ring: _Ring) -> int:
        view = ring.view
        pid = view.producer_id
        spilled = view.spilled  # read before the spill files: a later frame changes it, see has_pending
        spill_gen = view.spill_gen  # read before the write cursor: see RingProducer._spill
        w = view.write_word
        r = view.read_word
        n = 0
        while cursor_distance(r, w)[1]:
            # A backlog over one record (the agent was down) goes in as several, each with its position.
            part = view.boundary(r, w, _MAX_RING_RECORD)
            taken = view.take(r, part)
            if taken is None:
                break
            frames, count, after = taken
            if count == 1 and len(frames) > _MAX_SPILL_FRAME:
                # No WAL record holds it (a writer other than this SDK, which refuses such events): appending
                # it would fail for ever and hold up every ring. Skip that one event, loudly.
                log.error("ring %s: an event of %d bytes is larger than a WAL record (%d bytes) and is dropped",
                          view.path, len(frames), MAX_RECORD_BYTES)
            else:
                self._append(frames, count, pid, SRC_RING, 0, after)
                n += count
            view.read_word = r = after
        if r != w and not cursor_distance(r, w)[1]:
            # Equal modulo the counters (a resume position from the WAL is masked, the producer's word may
            # not be): take the producer's spelling, so the cheap has_pending compare sees "nothing".
            view.read_word = w
        if spill_gen and spilled != ring.spilled_seen:
            n += self._drain_spill(view, spill_gen)
            ring.spilled_seen = spilled
        return n

    def _drain_spill(self, view: RingView, newest: int) -> int:
        pid = view.producer_id
        gen, off = view.consumed
        if gen == 0:
            gen, off = 1, 0
            view.set_consumed(1, 0)
        n = 0
        while True:
            path = spill_path(view.spill_dir, pid, gen)
            try:
                with open(path, "rb") as f:
                    f.seek(off)
                    while True:
                        chunk = f.read(_MAX_RECORD)
                        if not chunk:
                            break
                        nbytes, cnt = split_frames(chunk)
                        if not cnt:
                            chunk = _read_big_frame(f, chunk, path, off)
                            nbytes, cnt = split_frames(chunk, len(chunk))
                            if not cnt:
                                break  # the producer is still writing it
                            if nbytes > _MAX_SPILL_FRAME:
                                # No WAL record holds it: skip that one event, loudly, and keep the rest.
                                log.error("%s: an event of %d bytes at byte %d is larger than a WAL record "
                                          "(%d bytes) and is dropped", path, nbytes, off, MAX_RECORD_BYTES)
                                off += nbytes
                                view.set_consumed(gen, off)
                                f.seek(off)
                                continue
                        off += nbytes
                        self._append(chunk[:nbytes], cnt, pid, SRC_SPILL, gen, off)
                        view.set_consumed(gen, off)
                        n += cnt
                        f.seek(off)
            except FileNotFoundError:
                pass
            if gen >= newest:
                return n
            # The producer only opens generation gen+1 after the agent consumed all of gen.
            path.unlink(missing_ok=True)
            gen, off = gen + 1, 0
            view.set_consumed(gen, 0)

    def _maybe_retire(self, name: str, ring: _Ring) -> int:
        """Delete a ring (and its spill files) once its producer is gone and everything is in the WAL; a
        producer that died without finish() also ends its run (``_end_crashed``), unless another ring holds
        the run. Returns the number of events that appended to the WAL (0 or 1)."""
        view = ring.view
        closed = view.closed  # read before the write word: frames published before closing are then seen
        if not closed:
            now = time.monotonic()
            if now - ring.checked < LIVENESS_SECONDS:
                return 0
            if view.producer_alive():
                ring.checked = now
                return 0
        if view.write_word != view.read_word:
            return 0
        gen = view.spill_gen
        if gen:
            cgen, coff = view.consumed
            path = spill_path(view.spill_dir, view.producer_id, gen)
            size = path.stat().st_size if path.exists() else 0
            if cgen != gen or coff < size:
                if closed:
                    return 0
                # Dead: a frame it wrote but had not counted yet, or one its death cut short. Read what is
                # whole (then retire on the next pass); a torn rest is all that can be left.
                got = self._drain_spill(view, gen)
                if got:
                    ring.events += got
                    return got
                log.warning("%s: %d bytes after byte %d are a spill frame cut short by the death of its "
                            "producer; dropped", path, size - view.consumed[1], view.consumed[1])
            for g in range(1, gen + 1):
                spill_path(view.spill_dir, view.producer_id, g).unlink(missing_ok=True)
        producer, run_id, pid, rank, dropped = view.producer_id, view.run_id, view.pid, view.rank, view.dropped
        crashed = not closed and not view.ended
        holders = self._holders(run_id, name) if crashed else []
        view.close()
        del self.rings[name]
        if not crashed:
            (self.ring_dir / name).unlink(missing_ok=True)
            log.info("producer %s finished: %d events ingested; ring removed", producer, ring.events)
            return 0
        log.warning("producer %s (pid %d) exited without finish(); its %d events are ingested", producer, pid,
                    ring.events)
        # Another rank's ring: this rank's end goes now (the sinks combine the ranks' ends into the run's).
        other_rank = any(r != rank for r in self._holder_ranks(run_id, name))
        if holders and not other_rank:
            # A ring of the dead one not drained yet: the last ring of the run ends it.
            log.info("run %s stays running: %s still hold it", run_id, ", ".join(holders))
        else:
            self._end_crashed(run_id, pid, rank, dropped)
        # Removed after the RunEnd is durable: an agent killed in between finds the ring again and ends the
        # run again, which every sink takes (the same status).
        (self.ring_dir / name).unlink(missing_ok=True)
        return 0 if holders and not other_rank else 1

    def _holders(self, run_id: str, name: str) -> list[str]:
        """Producers of other rings of the run (``name`` excluded), after a scan for rings created since the
        last one."""
        self.scan()
        return [r.view.producer_id for n, r in self.rings.items() if n != name and r.view.run_id == run_id]

    def _holder_ranks(self, run_id: str, name: str) -> set[int]:
        return {r.view.rank for n, r in self.rings.items() if n != name and r.view.run_id == run_id}

    def _end_crashed(self, run_id: str, pid: int, rank: int, dropped: int) -> None:
        """The last ring of a run is drained and its producer died without finish(): the run ends as crashed,
        after every event of it, durably."""
        self._note_run(run_id)
        error = (f"the trainer (pid {pid}, rank {rank}) exited without finish(): killed by a signal "
                 "(SIGKILL, SIGTERM, the OOM killer) or os._exit; everything it logged was ingested")
        buf = bytearray()
        append_frame(buf, encode_event(RunEnd(run_id, CRASHED, time.time(), error, dropped, rank)))
        with self._lock:
            self.wal.append(buf, 1, "agent", SRC_INTERNAL, 0, 0)
            self.wal.sync()  # before the ring goes: a power loss must not lose the run's end with it
        log.warning("run %s ended as %s: %s", run_id, CRASHED, error)

    # --- questions from the control server -------------------------------------------------------

    @_locked
    def has_pending(self) -> bool:
        """Cheap (a few loads, no syscall): does any ring or spill file hold frames not yet in the WAL?"""
        return any(r.view.write_word != r.view.read_word or r.view.spilled != r.spilled_seen
                   for r in self.rings.values())

    @_locked
    def set_sleeping(self, sleeping: bool) -> None:
        """Set (to a new sleep's number) or clear every ring's sleeping word: while it is set, a producer rings
        the doorbell after publishing, once per sleep."""
        if sleeping:
            self._sleep_no = self._sleep_no % _SLEEP_NO_MAX + 1  # never 0: 0 means awake
        value = self._sleep_no if sleeping else 0
        for ring in self.rings.values():
            ring.view.sleeping = value

    @_locked
    def find(self, producer_id: str) -> RingView | None:
        for ring in self.rings.values():
            if ring.view.producer_id == producer_id:
                return ring.view
        return None

    @_locked
    def reached(self, producer_id: str, ring_position: int, spill_gen: int, spill_position: int) -> bool:
        """True once the producer's events up to these positions are in the WAL (or the ring is retired)."""
        view = self.find(producer_id)
        if view is None:
            return not (self.ring_dir / f"{producer_id}.ring").exists()
        if not cursor_reached(view.read_word, ring_position):
            return False
        return not spill_gen or view.consumed >= (spill_gen, spill_position)

    @_locked
    def producers(self) -> list[dict[str, object]]:
        out = []
        for ring in self.rings.values():
            v = ring.view
            out.append({
                "producer": v.producer_id, "run_id": v.run_id, "pid": v.pid, "rank": v.rank, "events": ring.events,
                "backlog_bytes": v.pending[1], "spilled": v.spilled, "dropped": v.dropped,
                "closed": v.closed,
            })
        return out

    @_locked
    def close(self) -> None:
        for ring in self.rings.values():
            ring.view.close()
        self.rings.clear()
        try:
            self.ring_dir.rmdir()  # the agent's ring directory, once empty (the doorbell is closed first)
        except OSError:
            pass  # rings of producers still running or not drained stay, with their directory


def _read_big_frame(f: Any, chunk: bytes, path: Path, off: int) -> bytes:
    """The spill frame at ``off`` is larger than a read chunk (the ring sends any frame larger than itself
    to the spill file): read exactly that frame. Returns what is there, complete or not."""
    if len(chunk) < 4:
        return chunk
    (n,) = U32.unpack_from(chunk, 0)
    if n == PAD_MARKER:
        raise ProtocolError(f"padding frame at byte {off} of spill file {path}")
    rest: bytes = f.read(((n + 11) & ~7) - len(chunk))
    return chunk + rest


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
