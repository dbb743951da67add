"""The agent's checkpoint service: accepts staged checkpoints over the control socket, writes them one
at a time on a worker thread, emits CheckpointSaved once durable, and answers waiters."""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from flightlog.proto.checkpoint.format import CODECS, DTYPE_SIZES
from flightlog.proto.checkpoint.writer import commit_checkpoint, recover_interrupted
from flightlog.proto.errors import FlightlogError
from flightlog.proto.events import (
    Artifact,
    CheckpointRequest,
    CheckpointSaved,
    CheckpointSpec,
    CheckpointWait,
    Reply,
)

__all__ = ["CheckpointService", "decode_spec"]

log = logging.getLogger("flightlog.agent.checkpoint")

_KEEP_FINISHED = 256
_spec_decoder = msgspec.msgpack.Decoder(CheckpointSpec)


def decode_spec(raw: bytes | memoryview | msgspec.Raw) -> CheckpointSpec | str:
    """The request's CheckpointSpec, or an error message naming what is wrong with it."""
    try:
        spec = _spec_decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError included: its message names the key
        return f"malformed checkpoint request: {exc}"
    if not os.path.isabs(spec.path):
        return f"checkpoint path {spec.path!r} must be absolute"
    if spec.codec not in CODECS:
        return f"unknown checkpoint codec {spec.codec!r}; one of {', '.join(CODECS)}"
    for name, dtype, _shape, begin, end in spec.tensors:
        if dtype not in DTYPE_SIZES:
            return f"checkpoint tensor {name!r} has unknown dtype {dtype!r}"
        if not begin <= end <= spec.data_bytes:
            return f"checkpoint tensor {name!r} spans bytes [{begin}, {end}) outside the {spec.data_bytes} staged"
    return spec


@dataclass
class _Job:
    request_id: str
    spec: CheckpointSpec
    done: anyio.Event
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class CheckpointService:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._jobs: dict[str, _Job] = {}
        self._send: MemoryObjectSendStream[_Job]
        self._recv: MemoryObjectReceiveStream[_Job]
        self._send, self._recv = anyio.create_memory_object_stream[_Job](math.inf)
        #: (seconds, bytes) of each checkpoint written (the Prometheus endpoint's, when it is on)
        self.on_written: Callable[[float, int], None] | None = None

    def busy(self) -> bool:
        return any(not j.done.is_set() for j in self._jobs.values())

    async def run(self) -> None:
        interrupted = await anyio.to_thread.run_sync(recover_interrupted, self.agent.paths.store)
        for path in interrupted:
            log.warning("checkpoint %s was interrupted by an earlier agent's exit; its trainer re-sends it", path)
        async with self._recv:
            async for job in self._recv:
                try:
                    job.result = await anyio.to_thread.run_sync(self._commit, job)
                except FlightlogError as exc:
                    job.error = str(exc)
                    log.warning("checkpoint %s failed: %s", job.spec.path, exc)
                except Exception as exc:  # a bug must not kill the agent; the trainer hears about it
                    log.exception("checkpoint %s failed unexpectedly", job.spec.path)
                    job.error = f"unexpected error writing {job.spec.path}: {exc!r}"
                finally:
                    job.done.set()
                    self._prune()

    def _commit(self, job: _Job) -> dict[str, Any]:
        t0 = time.monotonic()

        def durable(row: dict[str, Any]) -> None:
            """Tell the trainer (and the sinks) now; retention's deletions come after. The write counts in
            /metrics first: a scrape after the trainer's wait() must see it."""
            if self.on_written is not None:
                self.on_written(time.monotonic() - t0, int(row.get("size") or 0))
            metrics = {k: float(v) for k, v in (row.get("metrics") or {}).items() if isinstance(v, (int, float))}
            self.agent.emit(CheckpointSaved(
                run_id=row.get("run_id") or "", path=row["path"], epoch=int(row["epoch"]), step=int(row["step"]),
                timestamp=time.time(), metrics=metrics, size=int(row["size"]), checksum=row["checksum"],
                is_best=bool(row["is_best"]),
            ))
            job.result = row
            anyio.from_thread.run_sync(job.done.set)
            self._queue_upload(row, job.spec.upload)

        # The writer and registry read the spec's keys; the Struct gave each its type and default.
        return commit_checkpoint(msgspec.to_builtins(job.spec), self.agent.paths.store, on_durable=durable)

    # --- uploads (checkpointing.upload) --------------------------------------------------------

    @property
    def upload_dir(self) -> Path:
        return Path(self.agent.paths.data_dir) / "uploads"

    def _queue_upload(self, row: dict[str, Any], policy: str) -> None:
        """Hand a durable checkpoint to the MLflow and W&B sinks as an Artifact event. The file is
        hard-linked into ``<data_dir>/uploads`` under the event's WAL seq, so retention may delete the
        checkpoint meanwhile (``uploads/<seq>/<file name>``: backends keep the file's own name); the link
        goes once every sink's cursor has passed the event. The sinks
        upload it with their own retries; a parked sink keeps it, like the rest of the WAL."""
        if policy == "none" or (policy == "best" and not row.get("is_best")):
            return
        src = Path(row["path"])

        def event(seq: int) -> Artifact:
            link = self.upload_dir / f"{seq:016d}" / src.name
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, link)
            except OSError:  # another filesystem (or no hard links): a copy, then
                shutil.copyfile(src, link)
            return Artifact(run_id=row.get("run_id") or "", name=src.name, path=str(link), timestamp=time.time(),
                            kind="checkpoint", checksum=row.get("checksum") or "", size=int(row.get("size") or 0))

        try:
            self.agent.emit(event)
        except Exception as exc:  # the checkpoint is durable and answered for: only the upload is lost
            log.warning("checkpoint %s is durable but cannot be queued for upload: %s", src, exc)

    def delete_uploaded(self, min_cursor_seq: int) -> None:
        """Remove upload links whose Artifact event every sink has passed."""
        try:
            entries = list(self.upload_dir.iterdir())
        except FileNotFoundError:
            return
        for p in entries:
            if p.name.isdigit() and int(p.name) < min_cursor_seq:
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        finished = [rid for rid, j in self._jobs.items() if j.done.is_set()]
        for rid in finished[:-_KEEP_FINISHED]:
            del self._jobs[rid]

    async def handle(self, msg: CheckpointRequest | CheckpointWait) -> Reply:
        if isinstance(msg, CheckpointRequest):
            if msg.request_id in self._jobs:
                return Reply(ok=True, data={"known": True})  # a re-send after a lost reply: idempotent
            spec = decode_spec(msg.spec)
            if isinstance(spec, str):
                return Reply(ok=False, error=spec)
            new = _Job(msg.request_id, spec, anyio.Event())
            self._jobs[msg.request_id] = new
            await self._send.send(new)
            return Reply(ok=True)
        job = self._jobs.get(msg.request_id)
        if job is None:
            return Reply(ok=False, error=f"this agent has no checkpoint request {msg.request_id} (it restarted?)",
                         data={"unknown": True})
        with anyio.move_on_after(msg.timeout):
            await job.done.wait()
        if not job.done.is_set():
            return Reply(ok=False, error="still writing", data={"pending": True})
        if job.error:
            return Reply(ok=False, error=job.error)
        return Reply(ok=True, data=job.result)
