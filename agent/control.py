"""The agent's control server: one task per connection on the Unix socket, the peer's uid checked
(SO_PEERCRED), length-prefixed control messages in and replies out. Registration, flush, socket-fallback
event batches, checkpoint requests and status go through here (client side: ``flightlog.proto.control``)."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from flightlog.proto.audit import record
from flightlog.proto.codec import FRAME_HEADER, decode_control, frame_control
from flightlog.proto.errors import ProtocolError
from flightlog.proto.events import (
    SCHEMA_VERSION,
    CheckpointRequest,
    CheckpointWait,
    EventBatch,
    FlushRequest,
    HealthRequest,
    Hello,
    Register,
    Reply,
    RunDeleteRequest,
    RunExportRequest,
    RunFilesRequest,
    StatusRequest,
    Unregister,
)
from flightlog.proto.frames import MAX_EVENT_BYTES, count_frames

from .access import AccessPolicy, Peer, RunOwners, export_run, peer_of
from .fdpass import open_run_files, send_reply_with_fds
from .runs_rm import serve_delete

if TYPE_CHECKING:
    from .daemon import Agent

__all__ = ["MAX_CONTROL_FRAME", "ControlServer", "peer_uid_allowed"]

log = logging.getLogger("flightlog.agent")

#: An EventBatch of the socket transport holds under 64 KiB of events plus one of up to MAX_EVENT_BYTES.
MAX_CONTROL_FRAME = MAX_EVENT_BYTES + (1 << 20)


def peer_uid_allowed(peer_uid: int, own_uid: int | None = None) -> bool:
    """Only the agent's own user (or root) may talk to it."""
    own = os.getuid() if own_uid is None else own_uid
    return peer_uid == own or peer_uid == 0


class ControlServer:
    """Serves control connections for ``agent``; counts the connections that registered a producer."""

    def __init__(self, agent: Agent, policy: AccessPolicy | None = None) -> None:
        self.agent = agent
        self.clients = 0
        self.policy = policy or AccessPolicy()
        self.owners = RunOwners(agent.paths.data_dir)

    async def handle(self, stream: SocketStream) -> None:
        registered: list[str] = []
        async with stream:
            peer = peer_of(stream.extra(SocketAttribute.raw_socket))
            if not self.policy.may_connect(peer.uid):
                log.warning("refused a control connection from uid %d (pid %d)", peer.uid, peer.pid)
                error = self.policy.connect_refusal(peer.uid)
                await anyio.to_thread.run_sync(lambda: record(
                    "access.refused", f"agent:{self.agent.paths.socket}", "denied", data_dir=self.agent.paths.data_dir,
                    uid=peer.uid, pid=peer.pid, detail="control connection"))
                await stream.send(frame_control(Reply(ok=False, error=error)))
                return
            reader = BufferedByteReceiveStream(stream)
            try:
                while True:
                    try:
                        header = await reader.receive_exactly(4)
                    except (anyio.EndOfStream, anyio.IncompleteRead):
                        return
                    (n,) = FRAME_HEADER.unpack(header)
                    if n > MAX_CONTROL_FRAME:
                        await stream.send(frame_control(Reply(ok=False, error="control frame too large")))
                        return
                    try:
                        msg = decode_control(await reader.receive_exactly(n))
                    except ProtocolError as exc:
                        await stream.send(frame_control(Reply(ok=False, error=str(exc))))
                        return
                    if isinstance(msg, RunFilesRequest):  # the reply, then the run's files as descriptors
                        await send_reply_with_fds(stream, *await anyio.to_thread.run_sync(
                            open_run_files, self.agent.paths, self.policy, self.owners, peer, msg))
                        continue
                    reply = await self.dispatch(msg, registered, peer)
                    await stream.send(frame_control(reply))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.IncompleteRead, OSError):
                return
            finally:
                if registered:
                    self.clients -= 1

    async def dispatch(self, msg: Any, registered: list[str], peer: Peer | None = None) -> Reply:
        agent = self.agent
        peer = peer or Peer(os.getpid(), os.getuid(), os.getgid())
        if isinstance(msg, RunExportRequest):
            return await anyio.to_thread.run_sync(export_run, agent.paths.store, agent.paths.data_dir, self.policy,
                                                  self.owners, peer, msg)
        if isinstance(msg, RunDeleteRequest):
            return await anyio.to_thread.run_sync(serve_delete, agent.paths.store, agent.paths.data_dir, self.policy,
                                                  self.owners, peer, msg)
        if isinstance(msg, Register) and msg.run_id and self.policy.multi_user:
            owner = await anyio.to_thread.run_sync(self.owners.claim, msg.run_id, peer.uid)
            if owner != peer.uid:
                return Reply(ok=False, error=f"run {msg.run_id} belongs to uid {owner}, not to uid {peer.uid}")
        if isinstance(msg, EventBatch) and self.policy.multi_user and msg.producer_id not in registered:
            # Another user's events could otherwise be written into a run under this connection's name.
            return Reply(ok=False, error=f"producer {msg.producer_id} was not registered on this connection")
        if isinstance(msg, Hello):
            if msg.schema > SCHEMA_VERSION:
                return Reply(ok=False, error=f"SDK schema {msg.schema} is newer than this agent's {SCHEMA_VERSION}")
            return Reply(ok=True, data={"pid": os.getpid(), "schema": SCHEMA_VERSION})
        if isinstance(msg, Register):
            if not registered:
                self.clients += 1
            registered.append(msg.producer_id)
            await anyio.to_thread.run_sync(agent.ingestor.scan)
            agent.ingest.kick()  # the new ring's sleeping word is set on the loop's next sleep
            return Reply(ok=True)
        if isinstance(msg, Unregister):
            if msg.producer_id in registered:
                registered.remove(msg.producer_id)
                if not registered:
                    self.clients -= 1
            return Reply(ok=True)
        if isinstance(msg, FlushRequest):
            return await self.flush(msg)
        if isinstance(msg, EventBatch):
            return await anyio.to_thread.run_sync(self._ingest_batch, msg)
        if isinstance(msg, (CheckpointRequest, CheckpointWait)):
            if not self.policy.may_write_for(peer.uid):
                return await anyio.to_thread.run_sync(self._refuse_checkpoint, peer)
            return await agent.checkpoints.handle(msg)  # type: ignore[no-any-return]
        if isinstance(msg, StatusRequest):
            return Reply(ok=True, data=agent.status())
        if isinstance(msg, HealthRequest):  # a long poll of the tracker's health watcher (agent/health.py)
            return Reply(ok=True, data=await agent.health.answer(msg))
        return Reply(ok=False, error=f"unexpected message {type(msg).__name__}")

    def _refuse_checkpoint(self, peer: Peer) -> Reply:
        record("access.refused", f"agent:{self.agent.paths.socket}", "denied", data_dir=self.agent.paths.data_dir,
               uid=peer.uid, pid=peer.pid, detail="checkpoint write through a multi-user agent")
        return Reply(ok=False, error=self.policy.write_refusal(peer.uid))

    def _ingest_batch(self, msg: EventBatch) -> Reply:
        """Frames sent over the socket (the fallback where rings are not safe): into the WAL as they are."""
        try:
            count = count_frames(msg.frames)
        except ProtocolError as exc:
            return Reply(ok=False, error=f"malformed event batch: {exc}")
        if count != msg.count:
            return Reply(ok=False, error=f"event batch claims {msg.count} frames, holds {count}")
        self.agent.ingestor.append_batch(msg.frames, count, msg.producer_id)
        self.agent.ingest.kick()  # its group commit covers this append
        self.agent.wake_sinks_now()
        return Reply(ok=True)

    async def flush(self, msg: FlushRequest) -> Reply:
        """Reply once the producer's events up to the given positions are in the WAL, fsynced."""
        agent = self.agent
        ing = agent.ingestor
        loop = agent.ingest
        rescan = True  # a ring the loop has not found yet
        with anyio.move_on_after(msg.timeout) as scope:
            while not await anyio.to_thread.run_sync(
                ing.reached, msg.producer_id, msg.ring_position, msg.spill_gen, msg.spill_position
            ):
                loop.kick(rescan=rescan)  # the loop may be asleep (a wake-up the doorbell missed)
                rescan = False
                await anyio.sleep(0.002)
            await anyio.to_thread.run_sync(agent.wal.sync)
        if scope.cancelled_caught:
            return Reply(ok=False, error=f"flush timed out after {msg.timeout} s")
        return Reply(ok=True, data={"next_seq": agent.wal.next_seq})
