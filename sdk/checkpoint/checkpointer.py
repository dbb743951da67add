"""ModelCheckpointer: saves (stage, then hand to a writer), lists, chooses and loads checkpoints."""
from __future__ import annotations

import atexit
import base64
import concurrent.futures
import functools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import torch

from flightlog.checkpoint.loading import apply_state, candidates, in_place_targets, read_state
from flightlog.checkpoint.staging import BOUNCE_BYTES, StagingBuffer, StagingPool, default_staging_dir, stage
from flightlog.checkpoint.state import FORMAT_TAG, collect_state, git_commit, metric_value, plan_layout
from flightlog.checkpoint.writers import AgentWriter, LocalWriter
from flightlog.proto.audit import audit_key_uses, record
from flightlog.proto.checkpoint.codecs import check_level
from flightlog.proto.checkpoint.crypto import ENCRYPTIONS
from flightlog.proto.checkpoint.format import EXTENSIONS
from flightlog.proto.checkpoint.keys import KeyRing, default_keyring, load_keyring
from flightlog.proto.checkpoint.reader import CheckpointReader
from flightlog.proto.checkpoint.registry import STANDALONE_NAME, Registry
from flightlog.proto.errors import CheckpointCorrupt, CheckpointError, CheckpointKeyError, FlightlogError
from flightlog.proto.events import CheckpointSpec, RetentionSpec
from flightlog.proto.names import check_file_name
from flightlog.proto.paths import resolve_paths
from flightlog.transport import rings_reach_agent
from flightlog.validate import check_run_id

__all__ = ["ModelCheckpointer", "CheckpointMetadata", "PendingCheckpoint", "check_checkpoint_name", "config_keyring",
           "encryption_keys"]

log = logging.getLogger("flightlog")


def check_checkpoint_name(name: Any) -> str:
    """A name for ``save(name=...)``: one plain file name, not "best"/"latest" (``load`` reads those as the
    run's best and newest), at most 100 bytes (the run id and extension go around it)."""
    check_file_name(name, "checkpoint name")
    if name in ("best", "latest") or len(name.encode()) > 100:
        raise ValueError(f"checkpoint name {name!r:.120} is 'best', 'latest' (load() reads those as this run's "
                         "best and newest) or longer than 100 bytes; pass another name")
    return str(name)


class CheckpointMetadata(msgspec.Struct, kw_only=True):
    """One durable checkpoint, as the registry records it."""

    path: str
    epoch: int
    step: int
    metrics: dict[str, float] = {}
    size: int = 0
    checksum: str = ""
    compression: str = ""
    dtypes: dict[str, int] = {}  # safetensors dtype -> bytes
    nbytes: int = 0  # uncompressed tensor bytes
    tensors: int = 0
    config_hash: str = ""
    git_commit: str = ""
    created: float = 0.0
    saved: float = 0.0
    is_best: bool = False
    run_id: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CheckpointMetadata:
        names = cls.__struct_fields__
        return cls(**{k: (row[k] if row[k] is not None else _DEFAULTS[k]) for k in names if k in row})


_DEFAULTS: dict[str, Any] = {"metrics": {}, "size": 0, "checksum": "", "compression": "", "dtypes": {}, "nbytes": 0,
                             "tensors": 0, "config_hash": "", "git_commit": "", "created": 0.0, "saved": 0.0,
                             "is_best": False, "run_id": "", "epoch": 0, "step": 0, "path": ""}


class PendingCheckpoint(str):
    """The final path of a checkpoint being written (a ``str``); ``wait()`` returns its metadata once the
    file is durable, or raises CheckpointError."""

    _future: concurrent.futures.Future[CheckpointMetadata]

    def __new__(cls, path: str, future: concurrent.futures.Future[CheckpointMetadata]) -> PendingCheckpoint:
        obj = super().__new__(cls, path)
        obj._future = future
        return obj

    @property
    def path(self) -> str:
        return str(self)

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> CheckpointMetadata:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise CheckpointError(f"checkpoint {self} is still being written after {timeout} s") from exc



class ModelCheckpointer:
    """Saves, lists, chooses and loads one run's checkpoints in ``checkpoint_dir``.

    ``save`` blocks only while tensors are copied into a shared-memory staging buffer and returns a
    PendingCheckpoint (the final path). Standalone it writes on a thread of this process and keeps its
    registry in ``checkpoint_dir/registry.db``; built with ``for_tracker`` it hands the write to the agent
    and uses the agent's store as registry.

    Checkpoints belong to a run (``run_id``; a new one unless given): files are named
    ``ckpt-<run id>-e<epoch>-s<step>``, and best, latest, listing and retention (``max_checkpoints``: the
    newest N plus the best) are per run, so runs sharing a directory never touch each other's files. Pass
    the same ``run_id`` to continue a run; ``run_id=`` on best/latest/list/load asks about another run's.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] = "checkpoints",
        max_checkpoints: int = 10,
        monitor: str | None = "val_loss",
        mode: str = "min",
        compression: str = "zstd",
        compression_level: int = 1,
        keep_every_n_steps: int = 0,
        *,
        min_free_bytes: int = 0,
        max_in_flight: int = 1,
        staging_dir: str | os.PathLike[str] | None = None,
        registry: str | os.PathLike[str] | None = None,
        run_id: str = "",
        config_hash: str = "",
        threads: int = 0,
        upload: str = "none",
        encryption: str = "none",
        keys: KeyRing | None = None,
        group: str = "",
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if upload not in ("none", "best", "all"):
            raise ValueError(f"upload must be 'none', 'best' or 'all', got {upload!r}")
        if max_checkpoints < 0 or keep_every_n_steps < 0 or max_in_flight < 1:
            raise ValueError("max_checkpoints and keep_every_n_steps must be >= 0, max_in_flight >= 1")
        check_level(compression, compression_level)
        self.encryption, self._keys = encryption_keys(encryption, keys)
        if self._keys is not None:  # loads here open with these keys: each use is an audit entry
            audit_key_uses(Path(registry).parent if registry else resolve_paths().data_dir)
        self.dir = Path(checkpoint_dir).expanduser().absolute()
        self.max_checkpoints, self.keep_every_n_steps = max_checkpoints, keep_every_n_steps
        self.monitor, self.mode = monitor, mode
        self.compression, self.compression_level = compression, compression_level
        self.min_free_bytes = min_free_bytes
        self.upload = upload  # done by the agent's MLflow/W&B sinks: only through a tracker
        self.group = group  # access.group: checkpoints shared with it (0640, the folder 0750)
        self.run_id = check_run_id(run_id) if run_id else uuid.uuid4().hex[:16]
        self.config_hash = config_hash
        self.registry_path = Path(registry) if registry else self.dir / STANDALONE_NAME
        self._local = LocalWriter(self.registry_path, threads)
        self._writer: LocalWriter | AgentWriter = self._local
        self._pool = StagingPool(Path(staging_dir) if staging_dir else default_staging_dir(), max_in_flight)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="flightlog-ckpt")
        self._pending: dict[str, PendingCheckpoint] = {}
        self._jobs: list[concurrent.futures.Future[None]] = []  # writer-thread work, retention included
        self._lock = threading.Lock()
        self._bounce: torch.Tensor | None = None
        copiers = min(8, torch.get_num_threads())
        self._copiers = (concurrent.futures.ThreadPoolExecutor(copiers, thread_name_prefix="flightlog-stage")
                         if copiers > 1 else None)
        self._closed = False
        self._git = git_commit(os.getcwd())
        self._finalizer = weakref.finalize(self, ModelCheckpointer._cleanup, self._pool)
        atexit.register(self._atexit)

    @classmethod
    def for_tracker(cls, tracker: Any) -> ModelCheckpointer:
        """A checkpointer configured by ``tracker.config.checkpointing``, writing through the tracker's agent."""
        c = tracker.config.checkpointing
        tracking = tracker.config.tracking
        ck = cls(
            Path.cwd() / c.checkpoint_dir, max_checkpoints=c.max_checkpoints, monitor=c.monitor, mode=c.mode,
            compression=c.compression, compression_level=c.compression_level,
            keep_every_n_steps=c.keep_every_n_steps, min_free_bytes=c.min_free_bytes,
            staging_dir=tracker.paths.ring_dir.parent / "ckpt", registry=tracker.paths.store,
            run_id=tracker.run_id, config_hash=tracker.metadata.config_hash,
            upload=c.upload if tracking.use_mlflow or tracking.use_wandb else "none",
            encryption=c.encryption, keys=config_keyring(c),
            group=tracker.config.access.group or "",
        )
        if rings_reach_agent(tracker.paths):  # an agent of another uid writes no file for us: see agent.control
            ck._writer = AgentWriter(tracker._link, tracker.paths, ck._local)
        return ck

    # --- saving --------------------------------------------------------------------------------

    def save(self, model: Any = None, epoch: int = 0, step: int = 0, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, is_best: bool | None = None, name: str | None = None,
             **metrics: Any) -> PendingCheckpoint:
        """Stage the training state and return its final path at once; the file appears there atomically
        when durable. Keyword arguments other than the named ones are metrics (``val_loss=0.3``).

        ``name="warmup-end"`` names the file ``ckpt-<run id>-warmup-end`` instead of by epoch and step (a
        later save of the same name replaces it); ``load("warmup-end")`` finds it. It counts in retention
        like any other checkpoint of the run."""
        if self._closed:
            raise CheckpointError("this ModelCheckpointer is closed")
        if name is not None:
            check_checkpoint_name(name)
        values = {k: metric_value(k, v) for k, v in metrics.items()}
        with self._lock:
            path = self._path_for(int(epoch), int(step), name)
            tensors, meta = collect_state(model, optimizer, scheduler, scaler)
            meta.update(epoch=int(epoch), step=int(step), metrics=values, is_best=is_best, run_id=self.run_id, name=name,
                        config_hash=self.config_hash, git_commit=self._git, created=time.time(),
                        torch=torch.__version__)
            manifest, order, aliases, total = plan_layout(tensors)
            meta["aliases"] = aliases
            buf = self._pool.acquire()
            try:
                staging = buf.ensure(total)
                stage(staging, manifest, order, self._pinned, self._copiers)
                spec = self._spec(path, buf, total, manifest, meta, is_best)
                future: concurrent.futures.Future[CheckpointMetadata] = concurrent.futures.Future()
                self._jobs = [j for j in self._jobs if not j.done()]
                self._jobs.append(self._executor.submit(self._write, spec, buf, future))
            except BaseException:
                self._free(buf)
                raise
            pending = PendingCheckpoint(path, future)
            self._pending[path] = pending
        future.add_done_callback(functools.partial(_report, path))
        return pending

    def _path_for(self, epoch: int, step: int, name: str | None = None) -> str:
        """The file this run's checkpoint at (epoch, step) goes to: ``ckpt-<run id>-e<epoch>-s<step>``, or,
        if a file this run did not register already holds that name (another registry's, a stray file),
        the same name with ``-1``, ``-2``, ... appended. A re-save of a step this run saved replaces its
        own file. (The writer refuses, too, to replace another run's: this only spares the error.)"""
        stem = f"ckpt-{self.run_id}-{name}" if name else f"ckpt-{self.run_id}-e{epoch:04d}-s{step:09d}"
        ext = EXTENSIONS[self.compression]
        path, n = self.dir / f"{stem}{ext}", 0
        while str(path) not in self._pending and os.path.lexists(path) and not self._registered_to_me(path):
            n += 1
            path = self.dir / f"{stem}-{n}{ext}"
        return str(path)

    def _registered_to_me(self, path: Path) -> bool:
        reg = self._registry()
        if reg is None:
            return False
        with reg:
            row = reg.get(str(path))
        return row is not None and (row["run_id"] or "") == self.run_id

    def _spec(self, path: str, buf: StagingBuffer, total: int, manifest: list[list[Any]], meta: dict[str, Any],
              is_best: bool | None) -> CheckpointSpec:
        """What the writer needs to write the staged checkpoint (the agent decodes the same Struct)."""
        dtypes: dict[str, int] = {}
        for _name, dtype, _shape, b, e in manifest:
            dtypes[dtype] = dtypes.get(dtype, 0) + e - b
        epoch, step = meta["epoch"], meta["step"]
        return CheckpointSpec(
            request_id=uuid.uuid4().hex, path=path, staging=str(buf.path), data_bytes=total,
            tensors=[(n, d, list(shape), b, e) for n, d, shape, b, e in manifest],
            metadata={"format": FORMAT_TAG, "epoch": str(epoch), "step": str(step),
                      "flightlog": json.dumps(meta, separators=(",", ":"))},
            codec=self.compression, level=self.compression_level, epoch=epoch, step=step, metrics=meta["metrics"],
            is_best=is_best, dtypes=dtypes,
            retention=RetentionSpec(max_checkpoints=self.max_checkpoints, keep_every_n_steps=self.keep_every_n_steps,
                                    monitor=self.monitor, mode=self.mode),  # type: ignore[arg-type]
            min_free_bytes=self.min_free_bytes, run_id=self.run_id, config_hash=self.config_hash,
            git_commit=self._git, created=meta["created"], upload=self.upload,  # type: ignore[arg-type]
            **self._seal_fields(),
            group=self.group,
        )

    def _seal_fields(self) -> dict[str, Any]:
        """The spec's encryption fields: the key travels to the writer (in memory, or over the private
        control socket to the agent), never into a file."""
        if self.encryption == "none" or self._keys is None:
            return {}
        key = self._keys.primary
        return {"encryption": self.encryption, "key_id": key.key_id, "key": base64.b64encode(key.material).decode()}

    def _free(self, buf: StagingBuffer, restage: int = 0) -> None:
        """Hand the staging buffer back. Encrypted checkpoints leave no plaintext staged: the buffer's file
        is unlinked after each write, and (``restage``: its size) a fresh one is made and pre-faulted here,
        on the writer thread after durability, so the next save is as quick as with a reused buffer."""
        try:
            if self.encryption != "none":
                buf.close()
                if restage:
                    buf.ensure(restage)
        except CheckpointError as exc:  # no room for the next one now: the next save tries (and says) again
            log.warning("flightlog: %s", exc)
        finally:
            self._pool.release(buf)

    def _pinned(self) -> torch.Tensor:
        if self._bounce is None:
            self._bounce = torch.empty(BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True)
        return self._bounce

    def _write(self, spec: CheckpointSpec, buf: StagingBuffer,
               future: concurrent.futures.Future[CheckpointMetadata]) -> None:
        """Runs on the writer thread; resolves ``future`` (and frees the staging buffer) the moment the
        checkpoint is durable, before retention's deletions."""
        released = False

        def durable(row: dict[str, Any]) -> None:
            nonlocal released
            released = True
            if self.encryption != "none":
                buf.close()  # the staged plaintext is gone before anyone hears the checkpoint is durable
                future.set_result(CheckpointMetadata.from_row(row))
                self._free(buf, restage=spec.data_bytes)
                return
            self._free(buf)
            future.set_result(CheckpointMetadata.from_row(row))

        try:
            row = self._writer.write(spec, on_durable=durable)
            if not future.done():
                durable(row)
        except BaseException as exc:
            if future.done():  # durable already; only the clean-up after it failed
                log.warning("flightlog: after checkpoint %s: %s", spec.path, exc)
            elif isinstance(exc, CheckpointError):
                future.set_exception(exc)
            elif isinstance(exc, FlightlogError):
                future.set_exception(CheckpointError(f"checkpoint {spec.path} failed: {exc}"))
            else:
                future.set_exception(CheckpointError(f"checkpoint {spec.path} failed unexpectedly: {exc!r}"))
        finally:
            if not released:
                self._free(buf)

    # --- waiting and listing -------------------------------------------------------------------

    def wait_all(self, timeout: float | None = None) -> list[CheckpointMetadata]:
        """Wait for every checkpoint saved so far, and for the retention that follows each; raises
        CheckpointError naming those that failed."""
        with self._lock:
            pending = list(self._pending.values())
            jobs, self._jobs = self._jobs, []
        deadline = None if timeout is None else time.monotonic() + timeout
        done, failed = [], []
        for p in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                done.append(p.wait(left))
            except CheckpointError as exc:
                if not p.done():
                    raise
                failed.append(f"{p}: {exc}")
            with self._lock:
                if p.done() and self._pending.get(str(p)) is p:
                    del self._pending[str(p)]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        unfinished = concurrent.futures.wait(jobs, left).not_done
        with self._lock:
            self._jobs[:0] = list(unfinished)
        if failed:
            raise CheckpointError(f"{len(failed)} checkpoint(s) failed: " + "; ".join(failed))
        return done

    def _settle(self) -> None:
        try:
            self.wait_all()
        except CheckpointError:
            pass  # already logged when it failed; listing shows what is durable

    def _registry(self) -> Registry | None:
        if not self.registry_path.exists():
            return None
        return Registry(self.registry_path)

    # (defined before ``list``: below it, ``list[str]`` would name the method)
    def runs(self) -> list[str]:
        """The run ids with durable checkpoints in this directory, the most recently saved first."""
        self._settle()
        reg = self._registry()
        if reg is None:
            return []
        with reg:
            return reg.runs(str(self.dir))

    def list(self, run_id: str | None = None) -> list[CheckpointMetadata]:
        """Durable checkpoints of this run (or of ``run_id``) in this directory, oldest first."""
        self._settle()
        reg = self._registry()
        if reg is None:
            return []
        with reg:
            return [CheckpointMetadata.from_row(r) for r in reg.entries(str(self.dir), run_id=self._run(run_id))]

    def best(self, run_id: str | None = None) -> str | None:
        """Path of this run's (or ``run_id``'s) best checkpoint (by ``is_best=`` or the monitored metric), or None."""
        return self._path_of("best", run_id)

    def latest(self, run_id: str | None = None) -> str | None:
        """Path of this run's (or ``run_id``'s) newest durable checkpoint, or None."""
        return self._path_of("latest", run_id)

    def _run(self, run_id: str | None) -> str:
        return self.run_id if run_id is None else run_id

    def _path_of(self, which: str, run_id: str | None) -> str | None:
        """The path of the run's ``best`` or ``latest`` row in this directory, once pending writes settled."""
        self._settle()
        reg = self._registry()
        if reg is None:
            return None
        with reg:
            row = getattr(reg, which)(str(self.dir), run_id=self._run(run_id))
        return str(row["path"]) if row else None

    # --- loading -------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike[str] = "latest", model: Any = None, optimizer: Any = None,
             scheduler: Any = None, scaler: Any = None, *, fallback: bool = False, map_location: Any = "cpu",
             strict: bool = True, restore_rng: bool = True, run_id: str | None = None) -> tuple[int, int]:
        """Verify and restore a checkpoint ("best" or "latest" of this run, or of ``run_id``; or a path, of
        any run; a pending one is waited for). Returns (epoch, step). A damaged file raises CheckpointCorrupt naming it; with ``fallback=True`` the
        newest older checkpoint that verifies is loaded instead.

        CPU tensors that already exist with the right dtype and shape (the model's parameters, the
        optimizer's state) are filled in place, each piece only after its frame's checksum passed; if a
        later frame turns out damaged, those tensors may hold part of this checkpoint (every byte of it
        verified), so after CheckpointCorrupt load another checkpoint, as ``fallback=True`` does."""
        target = os.fspath(path)
        if isinstance(path, PendingCheckpoint):
            path.wait()
        elif target in ("best", "latest"):
            self._settle()
        else:
            target = self._named(target, run_id)
            with self._lock:
                pending = self._pending.get(str(Path(target).absolute()))
            if pending is not None:
                pending.wait()
        into = in_place_targets(model, optimizer, scheduler, scaler) if map_location in (None, "cpu") else {}
        errors: list[CheckpointError] = []
        for cand, checksum in candidates(self._registry(), self.dir, target, fallback, self._run(run_id)):
            try:
                with CheckpointReader(cand, verify=False, expected_checksum=checksum, keys=self._keys) as reader:
                    state = read_state(reader, map_location, into)
            except CheckpointError as exc:
                if not fallback:
                    raise
                log.warning("flightlog: skipping checkpoint %s: %s", cand, exc)
                errors.append(exc)
                continue
            record("checkpoint.load", str(cand), run=self._run(run_id) or "",  # into the agent's data dir
                   data_dir=None if self.registry_path.name == STANDALONE_NAME else self.registry_path.parent)
            return apply_state(state, model, optimizer, scheduler, scaler, strict, restore_rng)
        if errors:  # all of them for want of a key: that is what to fix, not damage
            kind = CheckpointKeyError if all(isinstance(e, CheckpointKeyError) for e in errors) else CheckpointCorrupt
            raise kind(f"no valid checkpoint in {self.dir}: " + "; ".join(map(str, errors)))
        raise CheckpointError(f"no checkpoint to load for {target!r} in {self.dir}")

    def _named(self, target: str, run_id: str | None) -> str:
        """The file of the run's checkpoint saved with ``name=target``; ``target`` itself if it is a path."""
        if os.sep in target or os.path.lexists(target) or target in ("", ".", ".."):
            return target
        files = {f"ckpt-{self._run(run_id)}-{target}{ext}" for ext in EXTENSIONS.values()}
        for entry in reversed(self.list(run_id)):
            if Path(entry.path).name in files:
                return entry.path
        return target

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending writes, then release the staging buffers."""
        if self._closed:
            return
        self._closed = True
        try:
            self._settle() if timeout is None else self.wait_all(timeout)
        finally:
            self._executor.shutdown(wait=True)
            if self._copiers is not None:
                self._copiers.shutdown(wait=True)
            self._finalizer()
            atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        try:
            self.close()
        except CheckpointError as exc:
            log.warning("flightlog: %s", exc)

    @staticmethod
    def _cleanup(pool: StagingPool) -> None:
        pool.close()

    def __enter__(self) -> ModelCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def config_keyring(c: Any) -> KeyRing | None:
    """The keys ``checkpointing`` names (None when it names none and encrypts nothing: a reader then uses
    ``$FLIGHTLOG_CHECKPOINT_KEY``)."""
    if c.encryption == "none" and not c.key_file and not c.key_command:
        return None
    return load_keyring(key_env=c.key_env, key_file=c.key_file, key_command=c.key_command,
                        timeout=c.key_command_timeout_seconds)


def encryption_keys(encryption: str, keys: KeyRing | None) -> tuple[str, KeyRing | None]:
    """Check ``encryption`` and find its keys (``keys``, else ``$FLIGHTLOG_CHECKPOINT_KEY``) now, so a
    missing key fails the checkpointer's creation rather than a save."""
    if encryption not in ENCRYPTIONS:
        raise ValueError(f"encryption must be one of {', '.join(ENCRYPTIONS)}, got {encryption!r}")
    if encryption != "none" and keys is None:
        keys = default_keyring()
        if keys is None:
            raise CheckpointKeyError(
                f"checkpoint encryption {encryption} needs a key, and none is configured: set "
                "FLIGHTLOG_CHECKPOINT_KEY to a base64 key (`python -c 'import os,base64; "
                "print(base64.b64encode(os.urandom(32)).decode())'`), or checkpointing.key_file / key_command")
    return encryption, keys


def _report(path: str, future: concurrent.futures.Future[CheckpointMetadata]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("flightlog: checkpoint %s failed (training continues): %s", path, exc)
