"""The agent: one anyio task group owning ingest, group commit, sink runners, WAL retention and the
control server. Runs as a node daemon (`flightlog agent`) or as a sidecar started by the SDK."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio

from flightlog.proto.audit import audit_key_uses
from flightlog.proto.codec import encode_event
from flightlog.proto.config import AgentConfig, WalConfig, decode_config
from flightlog.proto.errors import AgentLocked
from flightlog.proto.events import Event
from flightlog.proto.frames import append_frame
from flightlog.proto.paths import AgentPaths, ensure_private_dir

from .access import AccessPolicy
from .control import ControlServer, peer_uid_allowed
from .doorbell import Doorbell
from .health import HealthBoard, HealthLoop
from .ingest import Ingestor
from .ingest_loop import IngestLoop
from .loops import IdleExitLoop, RetentionLoop
from .monitor import Monitor
from .plots import PlotService
from .prom import MetricsServer
from .runner import CursorStore, SinkRunner, WalFeed, linger_seconds
from .sharing import GroupSharing
from .sinks.base import Sink
from .wal import SRC_INTERNAL, WAL, WALReader

__all__ = ["Agent", "AgentLocked", "AgentSettings", "peer_uid_allowed"]

log = logging.getLogger("flightlog.agent")


_WAL, _AGENT = WalConfig(), AgentConfig()  # the defaults, from the one place they live


@dataclass
class AgentSettings:
    fsync: Literal["interval", "always", "never"] = _WAL.fsync
    fsync_ms: int = _WAL.fsync_ms
    segment_bytes: int = _WAL.segment_bytes
    max_wal_bytes: int = _WAL.max_bytes
    sidecar: bool = False
    idle_exit_seconds: float = _AGENT.idle_exit_seconds
    drain_timeout_seconds: float = 300.0
    metrics_address: str | None = _AGENT.metrics_address
    multi_user: bool = False  # `flightlog agent --multi-user`: serve every uid (see agent.access)
    access_group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, sidecar: bool = False) -> AgentSettings:
        """Settings from the agent's config (builtins: a loaded file, or what the SDK hands a sidecar),
        decoded into the config Structs: their defaults are the only ones."""
        config, problems = decode_config(cfg)
        for problem in problems:
            log.warning("agent settings: %s", problem)
        wal, agent = config.wal, config.agent
        return cls(
            fsync=wal.fsync, fsync_ms=wal.fsync_ms, segment_bytes=wal.segment_bytes, max_wal_bytes=wal.max_bytes,
            sidecar=sidecar, idle_exit_seconds=agent.idle_exit_seconds, extra=cfg,
            metrics_address=agent.metrics_address,
            multi_user=config.access.multi_user, access_group=config.access.group,
        )


class Agent:
    """Wires the parts together: the data directory's lock, the WAL, ingest, sink runners, the control server
    (``control``), the housekeeping loops (``loops``, ``ingest_loop``), and the status report."""

    def __init__(self, paths: AgentPaths, settings: AgentSettings | None = None,
                 sinks: list[Sink] | None = None) -> None:
        self.paths = paths
        self.settings = settings or AgentSettings()
        self._lock_fd = -1
        self._extra_sinks = list(sinks or [])
        self.runners: list[SinkRunner] = []
        self.control = ControlServer(self, AccessPolicy(multi_user=self.settings.multi_user,
                                                        group=self.settings.access_group))
        self.started = time.time()
        self._stop = anyio.Event()
        self.wal_lock = threading.Lock()  # ingest and agent-generated events append from worker threads
        self.checkpoints: Any = None
        self.sharing = GroupSharing(paths, self.settings.access_group, self._created_dirs)

    @property
    def clients(self) -> int:
        """Control connections with a registered producer."""
        return self.control.clients

    # --- lifecycle -----------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """Own the data directory, or raise AgentLocked (another agent does: connect to that one).

        ``flightlog agent`` calls it before the event loop starts, so that losing a start race is one line
        and an exit status, not a traceback out of a task group."""
        if self._lock_fd >= 0:
            return
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
        self.sharing.sweep()  # a missing access.group fails the start, naming it

    def _created_dirs(self) -> list[Path]:
        """Folders the sinks made outside the data directory (TensorBoard's), for access.group."""
        return [d for r in self.runners for d in getattr(r.sink, "created_dirs", ())]

    def _build_sinks(self) -> list[Sink]:
        from .sinks.store import LocalStoreSink

        sinks: list[Sink] = [LocalStoreSink(self.paths.store)]
        from .sinks import backend_sinks

        sinks.extend(backend_sinks(self.settings.extra, data_dir=self.paths.data_dir))
        sinks.extend(self._extra_sinks)
        return sinks

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (node daemon) or until idle and drained (sidecar)."""
        self.acquire_lock()
        audit_key_uses(self.paths.data_dir)  # the checkpoint keys this agent seals with leave audit entries
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
        self.ingest = IngestLoop(self.ingestor, Doorbell(self.paths.doorbell), self.paths.wal_dir, self._ingested,
                                 linger=linger_seconds(s.extra),
                                 fsync_every=s.fsync_ms / 1000.0 if s.fsync == "interval" else None,
                                 on_ingested_threadsafe=True)  # SinkRunner.wake is safe from any thread
        from .checkpoint.service import CheckpointService

        self.checkpoints = CheckpointService(self)
        self.monitor = Monitor(self.paths, self.ingestor.producers, self.emit, s.extra)
        self.plots = PlotService(self.paths, self.emit, activity=self._activity)
        self._build_delivery(s)
        self.health = HealthBoard(self)
        ensure_private_dir(self.paths.socket.parent)
        try:
            self.paths.socket.unlink()  # stale: we hold the lock, so no live agent uses it
        except FileNotFoundError:
            pass
        # Multi-user: anyone may connect (the folder's mode is the admin's call); SO_PEERCRED decides the rest.
        listener = await anyio.create_unix_listener(self.paths.socket, mode=0o666 if s.multi_user else 0o600)
        log.info("flightlog agent %d serving %s (data %s)", os.getpid(), self.paths.socket, self.paths.data_dir)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.ingest.run)  # also the WAL's group commit
                for runner in self.runners:
                    tg.start_soon(runner.run)
                for loop in (RetentionLoop(self).run, self.checkpoints.run, self.monitor.run, self.plots.run,
                             self.sharing.run):  # access.group: widens what the writers made private
                    tg.start_soon(loop)
                tg.start_soon(HealthLoop(self.health).run)
                if self.metrics is not None:
                    await tg.start(self.metrics.run)
                tg.start_soon(listener.serve, self.control.handle, tg)
                if s.sidecar:
                    tg.start_soon(IdleExitLoop(self, self.stop).run)
                task_status.started()
                await self._stop.wait()
                # Final drain: whatever the rings still hold goes into the WAL, durably.
                await anyio.to_thread.run_sync(self._drain_all)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                self.paths.socket.unlink(missing_ok=True)
                self.ingest.doorbell.close()
                self.ingestor.close()
                self.feed.close()
                self.cursors.close()
                self.health.close()
                self.wal.sync()
                self.wal.close()
                os.close(self._lock_fd)
            log.info("flightlog agent %d stopped", os.getpid())

    def _build_delivery(self, s: AgentSettings) -> None:
        """One delivery engine: a feed that decodes each WAL read once for every runner, one long-lived cursor
        store, and per sink a runner woken when its batch is full or its linger time has passed."""
        self.cursors = CursorStore(self.paths.store)
        self.feed = WalFeed(WALReader(self.paths.wal_dir, limit=self.wal.end_position))
        linger = linger_seconds(s.extra)
        wal = self.wal
        # agent.metrics_address (off by default): /metrics, and the sinks' latency measured
        self.metrics = MetricsServer(self, s.metrics_address) if s.metrics_address else None
        if self.metrics is not None:
            self.checkpoints.on_written = self.metrics.collector.checkpoint_written
        for sink in self._build_sinks():
            if self.metrics is not None:
                sink = self.metrics.wrap(sink)
            # idle_sleep: a sink that serves none of the runs logging is not woken for them; it passes over
            # their events (for WAL retention) on this safety poll, a read and a commit every 5 s.
            self.runners.append(SinkRunner(sink, self.feed, self.cursors, linger=linger, idle_sleep=5.0,
                                           tail=lambda: wal.next_seq))

    def stop(self) -> None:
        self._stop.set()

    def emit(self, event: Event | Callable[[int], Event]) -> int:
        """Append an agent-generated event (checkpoint saved, system stats) to the WAL; returns its seq.
        Thread-safe. ``event`` may be a function of the seq the event will get (it runs under the WAL
        lock, so nothing else is appended in between).

        The rings are drained first: what a producer published before it asked for this event (a tracker's
        RunStart, then a checkpoint of that run) must precede it in the WAL, or a sink that learns which runs
        it serves from their RunStart would pass over the event, not knowing the run yet (ingest gathers
        events for a window before it appends them)."""
        self.ingestor.drain()
        with self.wal_lock:
            ev = event(self.wal.next_seq) if callable(event) else event
            buf = bytearray()
            append_frame(buf, encode_event(ev))
            seq = self.wal.append(buf, 1, "agent", SRC_INTERNAL)
        self.ingest.kick()  # its group commit covers this append
        self.wake_sinks_now({ev.run_id})  # only the sinks of its run look (each would otherwise read and decode)
        return seq

    def _wake_sinks(self, runs: set[str] | None = None, since: float | None = None) -> None:
        """New events in the WAL (of ``runs``, if known; waiting since ``since``, if known), from any thread.
        Cheap: a runner only wakes when it waits for this much data (its batch is full, or it was idle) and
        its sink may want them."""
        next_seq = self.wal.next_seq
        for runner in self.runners:
            runner.wake(next_seq, runs, since)

    def wake_sinks_now(self, runs: set[str] | None = None) -> None:
        """Events appended outside the ingest loop's windows (the agent's own, a socket batch): the sinks take
        them at once. Not a linger from now: a sink lingering then ignores the next window's wake-up (its
        batch is not full) and that window's events waited a second linger (p99 past 0.5 s at 1,000/s)."""
        self._wake_sinks(runs, time.monotonic() - self.ingest.linger)

    def _activity(self) -> object:
        """What changes when a producer comes or goes, over a ring or over the socket (runs end then)."""
        return self.monitor.producer_key(), self.control.clients

    def _ingested(self) -> None:
        """The ingest loop made a window's events durable: wake the sinks of their runs."""
        self._wake_sinks(self.ingestor.take_drained_runs(), self.ingest.batch_since)

    # --- tasks ---------------------------------------------------------------------------------

    def _drain_all(self) -> int:
        self.ingestor.scan()
        n = self.ingestor.drain()
        if n and self.settings.fsync != "never":
            self.wal.sync()
        return n

    def _min_cursor_seq(self) -> int:
        return min((r.stats.cursor.seq for r in self.runners), default=0)

    def _caught_up(self) -> bool:
        next_seq = self.wal.next_seq
        # A quarantined event or run never holds this up: its cursor moved past it.
        return all(r.stats.cursor.seq >= next_seq for r in self.runners)

    # --- status --------------------------------------------------------------------------------

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
            "events_per_second": round(self.ingest.rate, 1), "events_total": self.ingestor.events_total,
            "ingest_wakeups": self.ingest.wakeups,
            "wal": {"next_seq": next_seq, "bytes": self.wal.total_bytes(), "segments": len(self.wal.segments()),
                    "corrupt_records_recovered": self.wal.recovery.corrupt_records,
                    # unreadable segments recovery moved aside at start (kept for `flightlog wal inspect`)
                    "bad_segments": [{"name": b.name, "path": str(b.path), "reason": b.reason}
                                     for b in self.wal.recovery.bad_segments],
                    "quarantined_files": len(self.wal.quarantined()),
                    "quarantine_dir": str(self.paths.wal_dir / "quarantine")},
            "sinks": sinks,
            "alerts": [*self.monitor.alerts(), *([self.ingest.error] if self.ingest.error else [])],
        }
