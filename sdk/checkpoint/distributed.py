"""Checkpoints of a distributed job: with torch.distributed initialised and a world of more than one,
``tracker.save_checkpoint`` on every rank goes through DCP into one directory per checkpoint (one file per
rank, then the metadata), which the coordinator registers once every rank's file is durable, in the
registry inside the checkpoint directory, which every node of the job shares."""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from flightlog.checkpoint.checkpointer import (
    CheckpointMetadata,
    ModelCheckpointer,
    PendingCheckpoint,
    check_checkpoint_name,
    config_keyring,
    encryption_keys,
)
from flightlog.checkpoint.state import metric_value
from flightlog.proto.checkpoint.keys import KeyRing
from flightlog.proto.checkpoint.registry import STANDALONE_NAME, Registry
from flightlog.proto.errors import CheckpointError
from flightlog.proto.osutil import fsync_dir, pid_alive
from flightlog.validate import check_run_id

__all__ = ["DistributedCheckpointer", "checkpointer_for", "distributed_world", "recover_partial", "DCP_SUFFIX"]

log = logging.getLogger("flightlog")

#: A distributed checkpoint is the directory ``ckpt-<run id>-e<epoch>-s<step>.dcp``.
DCP_SUFFIX = ".dcp"
#: Registry rows of distributed checkpoints: ``compression`` is ``dcp-<codec>``; ``request_id`` names the
#: coordinator's host and pid (``dcp:<host>:<pid>:<random>``), so only a process on that host judges it dead.
_KIND = "dcp-"


def distributed_world() -> int:
    """torch.distributed's world size when a process group is initialised, else 1 (never imports torch)."""
    if "torch" not in sys.modules:
        return 1
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def checkpointer_for(tracker: Any) -> Any:
    """The tracker's checkpointer: DCP for a world of more than one, else today's single-process one."""
    if distributed_world() > 1:
        return DistributedCheckpointer.for_tracker(tracker)
    return ModelCheckpointer.for_tracker(tracker)


def _host() -> str:
    return os.environ.get("FLIGHTLOG_NODE") or socket.gethostname()


def _writer_of(row: dict[str, Any]) -> tuple[str, int] | None:
    """(host, pid) of the coordinator that recorded a distributed checkpoint row, or None for other rows."""
    parts = str(row.get("request_id") or "").split(":")
    if not str(row.get("compression") or "").startswith(_KIND) or len(parts) < 4 or parts[0] != "dcp":
        return None
    pid = parts[-2]
    return (":".join(parts[1:-2]), int(pid)) if pid.isascii() and pid.isdigit() else None


def recover_partial(registry: str | os.PathLike[str]) -> list[str]:
    """Remove the directories of distributed saves whose coordinator died on this host before committing
    them (a rank died, then the job): they were never listed; their rows become failed. Returns them.
    A row another host's coordinator recorded is left to that host (a pid means nothing elsewhere)."""
    path = Path(registry)
    if not path.exists():
        return []
    out = []
    with Registry(path) as reg:
        for row in reg.entries(None, ("writing",)):
            writer = _writer_of(row)
            if writer is None or writer[0] != _host() or writer[1] == os.getpid() or pid_alive(writer[1]):
                continue  # not ours to judge, or a live coordinator is still writing it
            _remove(row["path"])
            reg.mark_interrupted(row["path"])
            out.append(row["path"])
    return out


def _remove(path: str) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
    try:
        fsync_dir(p.parent)
    except OSError:
        pass  # the directory itself is gone: nothing to make durable


class DistributedCheckpointer:
    """``save`` / ``load`` / ``best`` / ``latest`` / ``list`` of a distributed run, called on every rank.

    A save is a ``dcp.save`` (or ``dcp.async_save``) through flightlog's StorageWriter on a gloo group of
    its own (its collectives never mix with the training loop's, and give up after ``timeout``). The
    coordinator (rank 0) records the checkpoint as being written before any rank writes, and commits it in
    the StorageWriter's ``finish``, after the metadata: so a checkpoint is listed, best and counted by
    retention only once complete. A failed save is removed by the coordinator; one whose coordinator died
    too is removed by the next distributed checkpointer started on that host (``recover_partial``).
    """

    def __init__(self, checkpoint_dir: str | os.PathLike[str], *, run_id: str, config_hash: str = "",
                 compression: str = "zstd", compression_level: int = 1, max_checkpoints: int = 10,
                 keep_every_n_steps: int = 0, monitor: str | None = None, mode: str = "min",
                 async_save: bool = False, timeout: float = 1800.0, encryption: str = "none",
                 keys: KeyRing | None = None) -> None:
        import torch.distributed as dist

        self.dir = Path(checkpoint_dir).expanduser().absolute()
        self.registry_path = self.dir / STANDALONE_NAME
        self.run_id = check_run_id(run_id)
        self.config_hash = config_hash
        self.compression, self.compression_level = compression, compression_level
        self.retention = {"max_checkpoints": max_checkpoints, "keep_every_n_steps": keep_every_n_steps,
                          "monitor": monitor, "mode": mode}
        self.async_save = async_save
        self.encryption, self._keys = encryption_keys(encryption, keys)  # every rank file sealed, or none
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.timeout = timeout
        self._pg: Any = None
        self._stager: Any = None  # kept across saves: its CPU copies are reused, not allocated each time
        self._inflight: PendingCheckpoint | None = None
        self._pending: list[PendingCheckpoint] = []
        self._lock = threading.Lock()
        self._closed = False
        if self.rank == 0:
            for p in recover_partial(self.registry_path):
                log.warning("flightlog: removed the partial distributed checkpoint %s (its save never finished)", p)

    @classmethod
    def for_tracker(cls, tracker: Any) -> DistributedCheckpointer:
        c = tracker.config.checkpointing
        return cls(Path.cwd() / c.checkpoint_dir, run_id=tracker.run_id, config_hash=tracker.metadata.config_hash,
                   compression=c.compression, compression_level=c.compression_level,
                   max_checkpoints=c.max_checkpoints, keep_every_n_steps=c.keep_every_n_steps, monitor=c.monitor,
                   mode=c.mode, async_save=c.dcp_async, timeout=c.dcp_timeout_seconds,
                   encryption=c.encryption, keys=config_keyring(c))

    # --- saving --------------------------------------------------------------------------------

    def path_for(self, epoch: int, step: int, name: str | None = None) -> str:
        stem = name if name else f"e{epoch:04d}-s{step:09d}"
        return str(self.dir / f"ckpt-{self.run_id}-{stem}{DCP_SUFFIX}")

    def save(self, model: Any = None, epoch: int = 0, step: int = 0, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, is_best: bool | None = None, async_save: bool | None = None,
             name: str | None = None, **metrics: Any) -> PendingCheckpoint:
        """Save this rank's part; returns the checkpoint's directory (a str with ``.wait()``). Synchronous
        (``dcp.save``) unless ``async_save=True`` or ``checkpointing.dcp_async``: then the loop waits only
        for the copy into reused CPU buffers (and for the previous async save, whose buffers they are)."""
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        from flightlog.checkpoint.dcp import StorageWriter

        if self._closed:
            raise CheckpointError("this DistributedCheckpointer is closed")
        if name is not None:
            check_checkpoint_name(name)
        values = {k: metric_value(k, v) for k, v in metrics.items()}
        epoch, step = int(epoch), int(step)
        use_async = self.async_save if async_save is None else bool(async_save)
        path = self.path_for(epoch, step, name)
        with self._lock:
            self._wait_inflight()
            state = _state(model, optimizer, scheduler, scaler,
                           {"epoch": epoch, "step": step, "metrics": values, "run_id": self.run_id,
                            "world_size": self.world_size, "config_hash": self.config_hash, "created": time.time()})
            spec = self._spec(path, epoch, step, values, is_best)
            future: concurrent.futures.Future[CheckpointMetadata] = concurrent.futures.Future()
            begin, commit = self._hooks(spec) if self.rank == 0 else (None, None)
            writer = StorageWriter(path, codec=self.compression, level=self.compression_level, on_begin=begin,
                                   keys=self._keys if self.encryption != "none" else None,
                                   on_commit=commit)
            try:
                if use_async:
                    upload = dcp_async_save(state, storage_writer=writer, process_group=self._group,
                                            async_stager=self._staging())
                    # a stager that stages in the background would return both futures: not ours
                    done = upload if isinstance(upload, concurrent.futures.Future) else upload.upload_completion
                    done.add_done_callback(lambda f: self._settle(spec, f.exception(), future))
                else:
                    dcp_save(state, storage_writer=writer, process_group=self._group)
                    self._settle(spec, None, future)
            except (CheckpointException, CheckpointError, RuntimeError, OSError) as exc:
                # DCP's CheckpointException carries every rank's error; a broken collective is a RuntimeError
                self._settle(spec, exc, future)
            pending = PendingCheckpoint(path, future)
            self._pending.append(pending)
            if use_async:
                self._inflight = pending
        return pending

    @property
    def _group(self) -> Any:
        """The checkpoints' gloo group, made at the first save or load: ``new_group`` is a collective, and
        those are called on every rank (``best``/``latest``/``list`` may be called on one rank alone)."""
        if self._pg is None:
            import torch.distributed as dist

            self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        return self._pg

    def _staging(self) -> Any:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:
            import torch

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(cuda, False, False, False))
        return self._stager

    def _wait_inflight(self) -> None:
        if self._inflight is not None:
            try:
                self._inflight.wait()
            except CheckpointError:
                pass  # reported when it failed; its buffers are free now
            self._inflight = None

    def _spec(self, path: str, epoch: int, step: int, metrics: dict[str, float], is_best: bool | None
              ) -> dict[str, Any]:
        return {"path": path, "run_id": self.run_id, "epoch": epoch, "step": step, "metrics": metrics,
                "codec": f"{_KIND}{self.compression}", "level": self.compression_level, "is_best": is_best,
                "config_hash": self.config_hash, "created": time.time(), "retention": self.retention,
                "request_id": f"dcp:{_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"}

    def _hooks(self, spec: dict[str, Any]) -> tuple[Callable[[], None], Callable[[int, str], None]]:
        """The coordinator's StorageWriter hooks: before any rank writes, the row as being written (never
        listed, never a retention candidate; refused if the path is another run's); once the metadata is
        durable, its commit (listed, best, retention planned)."""

        def begin() -> None:
            with Registry(self.registry_path) as reg:
                reg.begin(spec, spec["path"])
            spec["begun"] = True

        def commit(size: int, checksum: str) -> None:
            with Registry(self.registry_path) as reg:
                spec["row"], spec["doomed"] = reg.commit(spec, size, checksum)

        return begin, commit

    def _settle(self, spec: dict[str, Any], exc: BaseException | None,
                future: concurrent.futures.Future[CheckpointMetadata]) -> None:
        """After DCP returned on this rank: resolve the future; the coordinator removes what retention
        dropped, or the whole directory of a save that failed (its row marked failed)."""
        path = spec["path"]
        if exc is None:
            for doomed in spec.get("doomed", []):
                _remove(doomed)
            row = spec.get("row") or {k: spec[k] for k in ("path", "epoch", "step", "metrics", "run_id")}
            future.set_result(CheckpointMetadata.from_row({**row, "metrics": row.get("metrics") or {}}))
            return
        if spec.get("begun"):  # the coordinator, and the directory is this run's
            try:
                with Registry(self.registry_path) as reg:
                    reg.fail(path, f"{type(exc).__name__}: {exc}")
            except CheckpointError as err:
                log.warning("flightlog: could not mark checkpoint %s failed: %s", path, err)
            _remove(path)
        log.error("flightlog: distributed checkpoint %s failed on rank %d (training continues): %s",
                  path, self.rank, exc)
        future.set_exception(CheckpointError(f"distributed checkpoint {path} failed: {exc}"))

    # --- waiting, listing, loading -------------------------------------------------------------

    def wait_all(self, timeout: float | None = None) -> list[CheckpointMetadata]:
        """Wait for this rank's saves; raises CheckpointError naming those that failed (once each)."""
        with self._lock:
            pending, self._pending = self._pending, []
        deadline = None if timeout is None else time.monotonic() + timeout
        done, failed = [], []
        for p in pending:
            try:
                done.append(p.wait(None if deadline is None else max(0.0, deadline - time.monotonic())))
            except CheckpointError as exc:
                if not p.done():
                    with self._lock:
                        self._pending.append(p)
                    raise
                failed.append(str(exc))
        if failed:
            raise CheckpointError(f"{len(failed)} checkpoint(s) failed: " + "; ".join(failed))
        return done

    def _rows(self) -> Registry | None:
        return Registry(self.registry_path, readonly=True) if self.registry_path.exists() else None

    def list(self, run_id: str | None = None) -> list[CheckpointMetadata]:
        reg = self._rows()
        if reg is None:
            return []
        with reg:
            return [CheckpointMetadata.from_row(r) for r in reg.entries(str(self.dir), run_id=run_id or self.run_id)]

    def best(self, run_id: str | None = None) -> str | None:
        return self._which("best", run_id)

    def latest(self, run_id: str | None = None) -> str | None:
        return self._which("latest", run_id)

    def _which(self, which: str, run_id: str | None) -> str | None:
        reg = self._rows()
        if reg is None:
            return None
        with reg:
            row = getattr(reg, which)(str(self.dir), run_id=run_id or self.run_id)
        return str(row["path"]) if row else None

    def load(self, path: str | os.PathLike[str] = "latest", model: Any = None, optimizer: Any = None,
             scheduler: Any = None, scaler: Any = None, *, strict: bool = True, run_id: str | None = None,
             **_ignored: Any) -> tuple[int, int]:
        """Load a distributed checkpoint on every rank, resharded to this job's world (DCP's planners):
        ``path`` is what ``save`` returned (from any job), or "best"/"latest" of this run (or ``run_id``'s).
        Returns (epoch, step)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        from flightlog.checkpoint.dcp import StorageReader

        target = os.fspath(path)
        if isinstance(path, PendingCheckpoint):
            path.wait()
        elif target in ("best", "latest"):
            self.wait_all()
            found = self._which(target, run_id)
            if found is None:
                raise CheckpointError(f"no {target} distributed checkpoint of run {run_id or self.run_id!r} "
                                      f"registered in {self.registry_path}")
            target = found
        elif os.sep not in target and not os.path.lexists(target) and target not in ("", ".", ".."):
            named = self.dir / f"ckpt-{run_id or self.run_id}-{target}{DCP_SUFFIX}"  # a save(name=...)
            target = str(named) if named.is_dir() else target
        directory = Path(target).absolute()
        reader = StorageReader(directory, expected_checksum=_registered_checksum(directory), keys=self._keys)
        state = _state(model, optimizer, None, None, {})
        state["flightlog"] = ""
        dcp_load(state, storage_reader=reader, planner=_plain_planner(), process_group=self._group)
        info = json.loads(state["flightlog"])
        if model is not None:
            set_state_dict(model, optimizer if optimizer is not None else [],
                           model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                           options=StateDictOptions(strict=strict))
        for key, obj in (("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None:
                if info.get(key) is None:
                    raise CheckpointError(f"{directory} holds no {key} state, but a {key} was given to load into")
                obj.load_state_dict(info[key])
        return int(info["epoch"]), int(info["step"])

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_all(timeout)
        except CheckpointError as exc:
            log.warning("flightlog: %s", exc)
        finally:
            if self._stager is not None:
                self._stager.close()


def _registered_checksum(directory: Path) -> str | None:
    """The checksum the shared registry holds for ``directory`` when it lists it as durable."""
    registry = directory.parent / STANDALONE_NAME
    if not registry.exists():
        return None
    with Registry(registry, readonly=True) as reg:
        row = reg.get(str(directory))
    return str(row["checksum"]) if row and row["state"] == "done" and row["checksum"] else None


def _state(model: Any, optimizer: Any, scheduler: Any, scaler: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The DCP state dict: the model's and optimizer's (DCP's get_state_dict: DDP's prefix stripped, FSDP2's
    DTensor shards), and flightlog's own fields as one JSON string (no pickled objects of ours)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state: dict[str, Any] = {}
    if model is not None:
        if optimizer is not None:
            state["model"], state["optim"] = get_state_dict(model, optimizer)
        else:
            state["model"] = get_model_state_dict(model)
    if scheduler is not None:
        info["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        info["scaler"] = scaler.state_dict()
    if info:
        try:
            state["flightlog"] = json.dumps(info, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"a distributed checkpoint keeps scheduler and scaler state as JSON: {exc}") from exc
    return state


def _plain_planner() -> Any:
    """DCP's default load planner, unpickling byte items with ``weights_only=True`` (plain data only)."""
    import io

    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem

    class PlainLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return PlainLoadPlanner()
