"""The agent: one anyio task group owning ingest, group commit, sink runners, WAL retention and the
control server. Runs as a node daemon (`flightlog agent`) or as a sidecar started by the SDK."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from flightlog.proto.paths import AgentPaths, ensure_private_dir
from flightlog.proto.codec import FRAME_HEADER, decode_control, encode_event, frame_control
from flightlog.proto.errors import FlightlogError, ProtocolError, WALError
from flightlog.proto.events import (
    SCHEMA_VERSION,
    CheckpointRequest,
    CheckpointWait,
    Event,
    EventBatch,
    FlushRequest,
    Hello,
    Register,
    Reply,
    StatusRequest,
    Unregister,
)

from .ingest import Ingestor
from .monitor import Monitor
from .plots import PlotService
from .runner import CursorStore, SinkRunner, WalFeed, linger_seconds
from .sinks.base import Sink
from flightlog.proto.frames import append_frame, count_frames

from .wal import SRC_INTERNAL, WAL, WALReader

__all__ = ["Agent", "AgentSettings", "AgentLocked", "peer_uid_allowed"]

log = logging.getLogger("flightlog.agent")

_MAX_CONTROL_FRAME = 16 << 20


class AgentLocked(FlightlogError):
    """Another agent already owns this data directory."""


@dataclass
class AgentSettings:
    fsync: str = "interval"
    fsync_ms: int = 100
    segment_bytes: int = 64 << 20
    max_wal_bytes: int = 0
    sidecar: bool = False
    idle_exit_seconds: float = 5.0
    drain_timeout_seconds: float = 300.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, sidecar: bool = False) -> AgentSettings:
        """Settings from the agent's config (builtins: a loaded file, or what the SDK hands a sidecar),
        decoded into the config Structs: their defaults are the only ones."""
        from flightlog.proto.config import decode_config

        config, problems = decode_config(cfg)
        for problem in problems:
            log.warning("agent settings: %s", problem)
        wal, agent = config.wal, config.agent
        return cls(
            fsync=wal.fsync, fsync_ms=wal.fsync_ms, segment_bytes=wal.segment_bytes, max_wal_bytes=wal.max_bytes,
            sidecar=sidecar, idle_exit_seconds=agent.idle_exit_seconds, extra=cfg,
        )


def peer_uid_allowed(peer_uid: int, own_uid: int | None = None) -> bool:
    """Only the agent's own user (or root) may talk to it."""
    own = os.getuid() if own_uid is None else own_uid
    return peer_uid == own or peer_uid == 0


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class Agent:
    def __init__(self, paths: AgentPaths, settings: AgentSettings | None = None,
                 sinks: list[Sink] | None = None) -> None:
        self.paths = paths
        self.settings = settings or AgentSettings()
        self._lock_fd = -1
        self._extra_sinks = list(sinks or [])
        self.runners: list[SinkRunner] = []
        self.clients = 0
        self.started = time.time()
        self._stop = anyio.Event()
        self._ingested = anyio.Event()
        self._rate = 0.0
        self.wal_lock = threading.Lock()  # ingest and agent-generated events append from worker threads
        self.checkpoints: Any = None
        self.ingest_error = ""

    # --- lifecycle -----------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        ensure_private_dir(self.paths.data_dir)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AgentLocked(f"another flightlog agent owns {self.paths.data_dir}") from exc
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _build_sinks(self) -> list[Sink]:
        from .sinks.store import LocalStoreSink

        sinks: list[Sink] = [LocalStoreSink(self.paths.store)]
        from .sinks import backend_sinks

        sinks.extend(backend_sinks(self.settings.extra, data_dir=self.paths.data_dir))
        sinks.extend(self._extra_sinks)
        return sinks

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (node daemon) or until idle and drained (sidecar)."""
        self._acquire_lock()
        s = self.settings
        self.wal = WAL(self.paths.wal_dir, segment_bytes=s.segment_bytes, fsync=s.fsync)
        rec = self.wal.recovery
        if rec.truncated_bytes or rec.corrupt_records:
            log.warning(
                "WAL recovery: %d torn-tail bytes truncated, %d corrupt records skipped",
                rec.truncated_bytes, rec.corrupt_records,
            )
        ensure_private_dir(self.paths.ring_dir.parent)
        ensure_private_dir(self.paths.ring_dir)
        self.ingestor = Ingestor(self.wal, self.paths.ring_dir, rec.producer_positions, lock=self.wal_lock)
        from .checkpoint.service import CheckpointService

        self.checkpoints = CheckpointService(self)
        self.monitor = Monitor(self.paths, self.ingestor.producers, self.emit, s.extra)
        self.plots = PlotService(self.paths, self.emit)
        # One delivery engine: a feed that decodes each WAL read once for every runner, one long-lived cursor
        # store, and per sink a runner woken when its batch is full or its linger time has passed.
        self.cursors = CursorStore(self.paths.store)
        self.feed = WalFeed(WALReader(self.paths.wal_dir, limit=self.wal.end_position))
        linger = linger_seconds(s.extra)
        wal = self.wal
        for sink in self._build_sinks():
            self.runners.append(SinkRunner(sink, self.feed, self.cursors, linger=linger, idle_sleep=2.0,
                                           tail=lambda: wal.next_seq))
        ensure_private_dir(self.paths.socket.parent)
        try:
            self.paths.socket.unlink()  # stale: we hold the lock, so no live agent uses it
        except FileNotFoundError:
            pass
        listener = await anyio.create_unix_listener(self.paths.socket, mode=0o600)
        log.info("flightlog agent %d serving %s (data %s)", os.getpid(), self.paths.socket, self.paths.data_dir)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ingest_loop)
                if s.fsync == "interval":
                    tg.start_soon(self._fsync_loop)
                for runner in self.runners:
                    tg.start_soon(runner.run)
                tg.start_soon(self._retention_loop)
                tg.start_soon(self.checkpoints.run)
                tg.start_soon(self.monitor.run)
                tg.start_soon(self.plots.run)
                tg.start_soon(listener.serve, self._handle, tg)
                if s.sidecar:
                    tg.start_soon(self._idle_exit_loop)
                task_status.started()
                await self._stop.wait()
                # Final drain: whatever the rings still hold goes into the WAL, durably.
                await anyio.to_thread.run_sync(self._drain_all)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                self.paths.socket.unlink(missing_ok=True)
                self.ingestor.close()
                self.feed.close()
                self.cursors.close()
                self.wal.sync()
                self.wal.close()
                os.close(self._lock_fd)
            log.info("flightlog agent %d stopped", os.getpid())

    def stop(self) -> None:
        self._stop.set()

    def emit(self, event: Event | Callable[[int], Event]) -> int:
        """Append an agent-generated event (checkpoint saved, system stats) to the WAL; returns its seq.
        Thread-safe. ``event`` may be a function of the seq the event will get (it runs under the WAL
        lock, so nothing else is appended in between)."""
        with self.wal_lock:
            ev = event(self.wal.next_seq) if callable(event) else event
            buf = bytearray()
            append_frame(buf, encode_event(ev))
            seq = self.wal.append(buf, 1, "agent", SRC_INTERNAL)
        self._wake_sinks()
        return seq

    def _wake_sinks(self) -> None:
        """New events in the WAL (called from the event loop and from worker threads). Cheap: a runner only
        wakes when it waits for this much data (its batch is full, or it was idle)."""
        next_seq = self.wal.next_seq
        for runner in self.runners:
            runner.wake(next_seq)

    # --- tasks ---------------------------------------------------------------------------------

    def _drain_all(self) -> int:
        self.ingestor.scan()
        n = self.ingestor.drain()
        if n and self.settings.fsync != "never":
            self.wal.sync()
        return n

    async def _ingest_loop(self) -> None:
        while True:
            try:
                await self._ingest()
            except (WALError, OSError) as exc:
                # Disk full, most likely. The rings keep every event (read cursors were not advanced):
                # keep the agent up, say so, and try again.
                self.ingest_error = f"cannot append to the WAL in {self.paths.wal_dir}: {exc}"
                log.error("%s; events wait in the rings and spill files; retrying in 1 s (free disk space)",
                          self.ingest_error)
                await anyio.sleep(1.0)

    async def _ingest(self) -> None:
        idle = 0.001
        last_scan = 0.0
        t0, n0 = time.monotonic(), 0
        while True:
            now = time.monotonic()
            n = 0
            if now - last_scan > 0.1:
                # New rings, and retiring finished producers (drain retires idle rings of dead producers).
                await anyio.to_thread.run_sync(self.ingestor.scan)
                n = await anyio.to_thread.run_sync(self.ingestor.drain)
                last_scan = now
            elif self.ingestor.has_pending():  # a few loads on the loop: no thread hop while idle
                n = await anyio.to_thread.run_sync(self.ingestor.drain)
            if n:
                self.ingest_error = ""
                idle = 0.0005
                self._wake_sinks()
                self._ingested.set()
                self._ingested = anyio.Event()
            else:
                await anyio.sleep(idle)
                idle = min(idle * 2, 0.01)
            if now - t0 >= 1.0:
                total = self.ingestor.events_total
                self._rate = (total - n0) / (now - t0)
                t0, n0 = now, total

    async def _fsync_loop(self) -> None:
        period = self.settings.fsync_ms / 1000.0
        while True:
            await anyio.sleep(period)
            await anyio.to_thread.run_sync(self.wal.sync)

    def _min_cursor_seq(self) -> int:
        return min((r.stats.cursor.seq for r in self.runners), default=0)

    async def _retention_loop(self) -> None:
        warned = False
        while True:
            await anyio.sleep(1.0)
            low = self._min_cursor_seq()
            deleted = await anyio.to_thread.run_sync(self.wal.delete_before, low)
            if deleted:
                log.info("WAL: deleted %d segments every sink has passed", len(deleted))
            await anyio.to_thread.run_sync(self.checkpoints.delete_uploaded, low)
            cap = self.settings.max_wal_bytes
            if cap and self.wal.total_bytes() > cap and not warned:
                warned = True
                lagging = [r.sink.name for r in self.runners if r.stats.cursor.seq == self._min_cursor_seq()]
                log.warning(
                    "WAL holds %d bytes, over wal.max_bytes=%d, because sink(s) %s lag; nothing is deleted "
                    "until they catch up: fix the backend or `flightlog wal replay` it elsewhere",
                    self.wal.total_bytes(), cap, ", ".join(lagging),
                )

    def _caught_up(self) -> bool:
        next_seq = self.wal.next_seq
        # A quarantined event or run never holds this up: its cursor moved past it.
        return all(r.stats.cursor.seq >= next_seq for r in self.runners)

    async def _idle_exit_loop(self) -> None:
        idle_since: float | None = None
        gone_since: float | None = None
        while True:
            await anyio.sleep(0.1)
            no_producers = self.clients == 0 and not self.ingestor.rings and not self.checkpoints.busy()
            now = time.monotonic()
            if not no_producers:
                idle_since = gone_since = None
                continue
            gone_since = gone_since or now
            if not self._caught_up() and now - gone_since < self.settings.drain_timeout_seconds:
                idle_since = None
                continue
            idle_since = idle_since or now
            if now - idle_since >= self.settings.idle_exit_seconds:
                if now - gone_since < self.settings.drain_timeout_seconds and await anyio.to_thread.run_sync(
                        self.plots.pending):
                    idle_since = None  # a run's final plots are still to come: render and deliver them first
                    continue
                if not self._caught_up():
                    log.warning("sidecar exiting with undelivered events; they stay in the WAL for the next agent")
                self.stop()
                return

    # --- control server ------------------------------------------------------------------------

    async def _handle(self, stream: SocketStream) -> None:
        registered: list[str] = []
        async with stream:
            raw = stream.extra(SocketAttribute.raw_socket)
            uid = _peer_uid(raw)
            if not peer_uid_allowed(uid):
                log.warning("refused a control connection from uid %d", uid)
                await stream.send(frame_control(Reply(ok=False, error=f"uid {uid} may not use this agent")))
                return
            reader = BufferedByteReceiveStream(stream)
            try:
                while True:
                    try:
                        header = await reader.receive_exactly(4)
                    except (anyio.EndOfStream, anyio.IncompleteRead):
                        return
                    (n,) = FRAME_HEADER.unpack(header)
                    if n > _MAX_CONTROL_FRAME:
                        await stream.send(frame_control(Reply(ok=False, error="control frame too large")))
                        return
                    try:
                        msg = decode_control(await reader.receive_exactly(n))
                    except ProtocolError as exc:
                        await stream.send(frame_control(Reply(ok=False, error=str(exc))))
                        return
                    reply = await self._dispatch(msg, registered)
                    await stream.send(frame_control(reply))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.IncompleteRead, OSError):
                return
            finally:
                if registered:
                    self.clients -= 1

    async def _dispatch(self, msg: Any, registered: list[str]) -> Reply:
        if isinstance(msg, Hello):
            if msg.schema > SCHEMA_VERSION:
                return Reply(ok=False, error=f"SDK schema {msg.schema} is newer than this agent's {SCHEMA_VERSION}")
            return Reply(ok=True, data={"pid": os.getpid(), "schema": SCHEMA_VERSION})
        if isinstance(msg, Register):
            if not registered:
                self.clients += 1
            registered.append(msg.producer_id)
            await anyio.to_thread.run_sync(self.ingestor.scan)
            return Reply(ok=True)
        if isinstance(msg, Unregister):
            if msg.producer_id in registered:
                registered.remove(msg.producer_id)
                if not registered:
                    self.clients -= 1
            return Reply(ok=True)
        if isinstance(msg, FlushRequest):
            return await self._flush(msg)
        if isinstance(msg, EventBatch):
            return await anyio.to_thread.run_sync(self._ingest_batch, msg)
        if isinstance(msg, (CheckpointRequest, CheckpointWait)):
            return await self.checkpoints.handle(msg)  # type: ignore[no-any-return]
        if isinstance(msg, StatusRequest):
            return Reply(ok=True, data=self.status())
        return Reply(ok=False, error=f"unexpected message {type(msg).__name__}")

    def _ingest_batch(self, msg: EventBatch) -> Reply:
        """Frames sent over the socket (the fallback where rings are not safe): into the WAL as they are."""
        try:
            count = count_frames(msg.frames)
        except ProtocolError as exc:
            return Reply(ok=False, error=f"malformed event batch: {exc}")
        if count != msg.count:
            return Reply(ok=False, error=f"event batch claims {msg.count} frames, holds {count}")
        self.ingestor.append_batch(msg.frames, count, msg.producer_id)
        self._wake_sinks()
        return Reply(ok=True)

    async def _flush(self, msg: FlushRequest) -> Reply:
        ing = self.ingestor
        with anyio.move_on_after(msg.timeout) as scope:
            while not await anyio.to_thread.run_sync(
                ing.reached, msg.producer_id, msg.ring_position, msg.spill_gen, msg.spill_position
            ):
                with anyio.move_on_after(0.005):
                    await self._ingested.wait()
            await anyio.to_thread.run_sync(self.wal.sync)
        if scope.cancelled_caught:
            return Reply(ok=False, error=f"flush timed out after {msg.timeout} s")
        return Reply(ok=True, data={"next_seq": self.wal.next_seq})

    def status(self) -> dict[str, Any]:
        next_seq = self.wal.next_seq
        sinks = {}
        for r in self.runners:
            st = r.stats
            _events, nbytes = r.feed.backlog(st.cursor)
            sinks[r.sink.name] = {
                "state": st.state, "backlog_events": max(0, next_seq - st.cursor.seq), "backlog_bytes": nbytes,
                "last_error": st.last_error, "events_per_second": round(st.rate, 1), "delivered": st.delivered,
                "undecodable": st.undecodable, "retries": st.retries, "linger_ms": round(r.linger * 1000),
                "quarantined_events": st.quarantined_events,
                "quarantined_runs": sorted(r.core.quarantined_runs) if r.core is not None else [],
                "quarantine_dir": str(r.quarantine.directory(r.sink.name)),
            }
        return {
            "pid": os.getpid(), "uptime_seconds": round(time.time() - self.started, 1),
            "data_dir": str(self.paths.data_dir), "socket": str(self.paths.socket),
            "clients": self.clients, "producers": self.ingestor.producers(),
            "events_per_second": round(self._rate, 1), "events_total": self.ingestor.events_total,
            "wal": {"next_seq": next_seq, "bytes": self.wal.total_bytes(), "segments": len(self.wal.segments()),
                    "corrupt_records_recovered": self.wal.recovery.corrupt_records},
            "sinks": sinks,
            "alerts": [*self.monitor.alerts(), *([self.ingest_error] if self.ingest_error else [])],
        }
