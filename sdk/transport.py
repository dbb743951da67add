"""How a tracker's events reach the agent, with one writer discipline: the thread that created the tracker
(the owner) writes into the run's single-producer ring without a lock; every other thread goes through a
side channel behind a lock — a second ring of its own, or, where rings are not safe, the socket batcher
that every thread shares.

Two rings of one run are drained by the agent in no fixed order, so the side channel keeps the order that
matters with fences: it opens only after the owner ring's RunStart is in the WAL (a flush; when no agent
answers, the side ring starts with a copy of the RunStart instead, which every sink takes idempotently),
and ``fence_before_end`` makes the other channel durable before RunEnd goes out.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid

from flightlog.link import AgentLink
from flightlog.proto.codec import event_encoder
from flightlog.proto.config import AgentConfig
from flightlog.proto.errors import AgentUnavailable, FlightlogError
from flightlog.proto.events import Event, EventBatch, FlushRequest, Register, RunEnd, RunStart
from flightlog.proto.frames import append_frame, check_event_size
from flightlog.proto.paths import AgentPaths, ensure_ring_dir
from flightlog.ring import RingProducer

__all__ = ["Transport", "RingTransport", "SocketTransport", "NO_OWNER", "open_transport", "rings_reach_agent"]

log = logging.getLogger("flightlog")

#: An owner id no thread has: every call takes the side channel (socket transport; a finished run).
NO_OWNER = -1
_SOCKET_BATCH = 64 << 10


class Transport:
    """What both transports share: the owner thread, the lock of the side channel, and the run's end."""

    producer_id: str
    owner: int
    ring: RingProducer | None = None  # the owner's ring

    def __init__(self, run_id: str, link: AgentLink) -> None:
        self.run_id = run_id
        self.link = link
        self.lock = threading.Lock()  # the side channel's: never taken by the owner's hot path
        self.closed = False

    def emit(self, event: Event) -> None:
        """Any event, from any thread."""
        raise NotImplementedError

    def emit_side(self, event: Event) -> None:
        """An event from a thread other than the owner (or from any thread, for the socket transport)."""
        raise NotImplementedError

    def mark_start(self, start: RunStart) -> None:
        """Called right after the RunStart went out (the side channel's start fence)."""

    def fence_before_end(self) -> None:
        """Make what other channels hold durable before the calling thread writes the RunEnd."""

    def flush(self, timeout: float) -> None:
        raise NotImplementedError

    def registrations(self) -> list[Register]:
        raise NotImplementedError

    @property
    def dropped(self) -> int:
        return 0

    def close(self) -> None:
        raise NotImplementedError

    def _closed_error(self) -> FlightlogError:
        return FlightlogError(f"run {self.run_id} is finished; events logged after finish() are refused")


class RingTransport(Transport):
    """The owner's ring (lock-free) plus a side ring, opened when another thread first logs."""

    def __init__(self, paths: AgentPaths, agent: AgentConfig, run_id: str, rank: int, link: AgentLink) -> None:
        super().__init__(run_id, link)
        self.paths, self.rank, self._agent = paths, rank, agent
        self.owner = threading.get_ident()
        self.producer_id = f"{run_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ring: RingProducer = self._open_ring(self.producer_id)
        self.buf = bytearray(512)  # the owner's: encode_into resizes it to each payload
        self.side: RingProducer | None = None
        self._side_buf = bytearray(512)
        self._start: RunStart | None = None
        self._start_pos: tuple[int, int, int] = (0, 0, 0)

    def _open_ring(self, producer_id: str) -> RingProducer:
        a = self._agent
        ensure_ring_dir(self.paths)  # the agent's check, so neither side uses a directory the other refuses
        return RingProducer(
            self.paths.ring_dir / f"{producer_id}.ring", a.ring_bytes, producer_id, self.paths.spill_dir,
            rank=self.rank, on_full=a.on_full, block_timeout=a.block_timeout_seconds, run_id=self.run_id,
        )

    def _register(self, ring: RingProducer) -> Register:
        return Register(producer_id=ring.producer_id, ring_path=str(ring.path), pid=os.getpid(), rank=self.rank,
                        run_id=self.run_id)

    def registrations(self) -> list[Register]:
        return [self._register(self.ring)]

    def emit(self, event: Event) -> None:
        if threading.get_ident() == self.owner:
            event_encoder.encode_into(event, self.buf, 0)
            self.ring.write_frame(self.buf)
        else:
            self.emit_side(event)
        if type(event) is RunEnd:
            self._mark_ended()

    def _mark_ended(self) -> None:
        """The RunEnd is in a ring: a kill from now on (finish still flushing, or waiting for checkpoints)
        is not a crash. Both rings: the agent retires them in no fixed order."""
        self.ring.mark_ended()
        side = self.side
        if side is not None:
            side.mark_ended()

    def emit_side(self, event: Event) -> None:
        with self.lock:
            if self.closed:
                raise self._closed_error()
            side = self.side or self._open_side()
            event_encoder.encode_into(event, self._side_buf, 0)
            side.write_frame(self._side_buf)

    def mark_start(self, start: RunStart) -> None:
        self._start = start
        self._start_pos = self.ring.positions()

    def _open_side(self) -> RingProducer:
        """The side ring, once the RunStart is known to come first in the WAL (called with the lock held)."""
        fenced = self._flush_one(self.producer_id, self._start_pos, 30.0)
        side = self._open_ring(f"{self.producer_id}-side")
        if not fenced and self._start is not None:
            # No agent to order the rings: the RunStart leads this ring too (sinks take it idempotently).
            event_encoder.encode_into(self._start, self._side_buf, 0)
            side.write_frame(self._side_buf)
        self.side = side
        self.link.register(self._register(side))
        return side

    def _flush_one(self, producer_id: str, pos: tuple[int, int, int], timeout: float) -> bool:
        """True once the agent has the producer's events up to ``pos`` fsynced in its WAL."""
        if not self.link.connected:
            return False
        try:
            reply = self.link.request(FlushRequest(producer_id, *pos, timeout), timeout + 5, reconnect=False)
        except AgentUnavailable:
            return False
        return reply.ok

    def fence_before_end(self) -> None:
        if threading.get_ident() == self.owner:
            other = self.side
        else:
            other = self.ring
            with self.lock:
                if self.side is None and not self.closed:
                    self._open_side()  # the RunEnd goes through it
        if other is not None and not self._flush_one(other.producer_id, _positions(other), 60.0):
            log.warning("flightlog: no agent to order the events of run %s logged from other threads before its "
                        "end; they are kept and delivered, maybe after the run's end", self.run_id)

    def flush(self, timeout: float) -> None:
        rings = [self.ring] + ([self.side] if self.side is not None else [])
        for ring in rings:
            reply = self.link.request(FlushRequest(ring.producer_id, *_positions(ring), timeout), timeout + 5)
            if not reply.ok:
                raise FlightlogError(f"flush failed: {reply.error}")

    @property
    def dropped(self) -> int:
        return self.ring.dropped + (self.side.dropped if self.side is not None else 0)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.owner = NO_OWNER
            self.ring.close()
            if self.side is not None:
                self.side.close()


def _positions(ring: RingProducer) -> tuple[int, int, int]:
    """The ring's positions read from any thread: read until two reads agree (the owner may be writing)."""
    pos = ring.positions()
    while (again := ring.positions()) != pos:
        pos = again
    return pos


class SocketTransport(Transport):
    """CPUs without the ring's store ordering: frames batched in memory (every thread, behind the lock) and
    sent to the agent every 64 KiB and at flush. Weaker than the ring: events not yet sent are lost if the
    trainer dies, and a batch re-sent after an agent crash may be ingested twice (see the README)."""

    def __init__(self, run_id: str, rank: int, link: AgentLink) -> None:
        super().__init__(run_id, link)
        self.owner = NO_OWNER  # one channel for every thread
        self.rank = rank
        self.producer_id = f"{run_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._pending = bytearray()
        self._count = 0
        self._buf = bytearray(512)

    def registrations(self) -> list[Register]:
        return [Register(producer_id=self.producer_id, ring_path="", pid=os.getpid(), rank=self.rank,
                         run_id=self.run_id)]

    def emit(self, event: Event) -> None:
        self.emit_side(event)

    def emit_side(self, event: Event) -> None:
        with self.lock:
            if self.closed:
                raise self._closed_error()
            event_encoder.encode_into(event, self._buf, 0)
            check_event_size(self._buf)  # the ring producer's slow path makes the same check
            append_frame(self._pending, bytes(self._buf))
            self._count += 1
            if len(self._pending) >= _SOCKET_BATCH:
                self._send()

    def _send(self) -> None:
        if not self._count:
            return
        reply = self.link.request(EventBatch(self.producer_id, bytes(self._pending), self._count))
        if not reply.ok:
            raise FlightlogError(f"the agent refused a batch of events: {reply.error}")
        self._pending.clear()
        self._count = 0

    def flush(self, timeout: float) -> None:
        with self.lock:
            self._send()

    def close(self) -> None:
        with self.lock:
            self.closed = True


def rings_reach_agent(paths: AgentPaths) -> bool:
    """Whether the agent on ``paths.socket`` can open this process's rings: only an agent of our own uid can.
    A node-wide agent run as a service account (``--multi-user``) cannot enter our private ring folder
    (``/dev/shm/flightlog-<uid>``), nor we its own, so a trainer of another uid sends its events over the
    socket. The socket file belongs to the uid that bound it; no socket yet means the agent will be ours
    (a sidecar we start)."""
    try:
        agent_uid = os.stat(paths.socket).st_uid
    except OSError:
        return True
    if agent_uid == os.getuid():
        return True
    log.info("flightlog: the agent on %s runs as uid %d, not ours (%d); events go to it over its socket",
             paths.socket, agent_uid, os.getuid())
    return False


def open_transport(paths: AgentPaths, agent: AgentConfig, run_id: str, rank: int, link: AgentLink,
                   ring: bool) -> Transport:
    return RingTransport(paths, agent, run_id, rank, link) if ring else SocketTransport(run_id, rank, link)

