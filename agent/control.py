"""The agent's control server: one task per connection on the Unix socket, the peer's uid checked
(SO_PEERCRED), length-prefixed control messages in and replies out. Registration, flush, socket-fallback
event batches, checkpoint requests and status go through here (client side: ``flightlog.proto.control``)."""
from __future__ import annotations

import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

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
    StatusRequest,
    Unregister,
)
from flightlog.proto.frames import MAX_EVENT_BYTES, count_frames

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


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves control connections for ``agent``; counts the connections that registered a producer."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.clients = 0

    async def handle(self, stream: SocketStream) -> None:
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
                    if n > MAX_CONTROL_FRAME:
                        await stream.send(frame_control(Reply(ok=False, error="control frame too large")))
                        return
                    try:
                        msg = decode_control(await reader.receive_exactly(n))
                    except ProtocolError as exc:
                        await stream.send(frame_control(Reply(ok=False, error=str(exc))))
                        return
                    reply = await self.dispatch(msg, registered)
                    await stream.send(frame_control(reply))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.IncompleteRead, OSError):
                return
            finally:
                if registered:
                    self.clients -= 1

    async def dispatch(self, msg: Any, registered: list[str]) -> Reply:
        agent = self.agent
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
            return await agent.checkpoints.handle(msg)  # type: ignore[no-any-return]
        if isinstance(msg, StatusRequest):
            return Reply(ok=True, data=agent.status())
        if isinstance(msg, HealthRequest):  # a long poll of the tracker's health watcher (agent/health.py)
            return Reply(ok=True, data=await agent.health.answer(msg))
        return Reply(ok=False, error=f"unexpected message {type(msg).__name__}")

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
        self.agent._wake_sinks()
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
