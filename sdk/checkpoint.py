"""Checkpoints from the training loop: stage the state into shared memory (the only time training is
blocked), then have it written durably by the agent, or by a writer thread here when there is none.

No pickle anywhere: tensors go into the safetensors data, everything else (epoch, step, optimizer
param groups, scheduler and scaler state, RNG states) into JSON in the safetensors ``__metadata__``.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import functools
import json
import logging
import os
import random
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import torch

from flightlog.proto.checkpoint.codecs import check_level
from flightlog.proto.checkpoint.format import DTYPE_SIZES, EXTENSIONS
from flightlog.proto.checkpoint.reader import CheckpointReader
from flightlog.proto.checkpoint.registry import STANDALONE_NAME, Registry
from flightlog.proto.checkpoint.writer import commit_checkpoint, recover_interrupted
from flightlog.proto.osutil import pid_alive
from flightlog.proto.paths import ensure_private_dir
from flightlog.proto.errors import AgentUnavailable, CheckpointCorrupt, CheckpointError, FlightlogError
from flightlog.proto.events import CheckpointRequest, CheckpointWait

__all__ = ["ModelCheckpointer", "CheckpointMetadata", "PendingCheckpoint"]

log = logging.getLogger("flightlog")

FORMAT_TAG = "flightlog-checkpoint/1"
_TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_DTYPES_BY_NAME = {v: k for k, v in _TORCH_DTYPES.items()}
_BOUNCE_BYTES = 64 << 20


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


# --- state <-> (tensors, JSON) ---------------------------------------------------------------------


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a state value; tensors are moved to ``tensors`` under ``@path`` names."""
    if isinstance(obj, torch.Tensor):
        name = "@" + path
        tensors[name] = obj
        return {"__tensor__": name}
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    for kind in (bool, int, float, str):  # subclasses (IntEnum, ...) are stored as their base type
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(type(k) is str and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{path}/key", tensors), _encode(v, f"{path}/{k}", tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    mod = type(obj).__module__
    if mod == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
        if isinstance(obj, np.generic):
            return obj.item()
    raise CheckpointError(
        f"cannot store the value at {path!r} ({type(obj).__name__}) without pickle: only tensors, numbers, "
        "strings, lists, tuples and dicts are stored; convert it in your state_dict"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__ndarray__" in obj:
        import numpy as np

        return np.array(obj["data"], dtype=np.dtype(obj["__ndarray__"])).reshape(obj["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].clone())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.clone() for t in state["cuda"]])


def _metric(name: str, value: Any) -> float:
    if isinstance(value, bool) or not hasattr(value, "__float__") or isinstance(value, (str, bytes)):
        raise TypeError(f"checkpoint metric {name!r} must be a number, got {type(value).__name__}")
    return float(value)


@functools.lru_cache(maxsize=8)
def _git_commit(cwd: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


# --- staging -------------------------------------------------------------------------------------


def _default_staging_dir() -> Path:
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    return base / f"flightlog-{os.getuid()}" / "ckpt"


class _StagingBuffer:
    """One shared-memory file, mapped once, pre-faulted, grown when a bigger state comes along."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.capacity = 0
        self.tensor: torch.Tensor | None = None

    def ensure(self, n: int) -> torch.Tensor:
        if n > self.capacity or self.tensor is None:
            size = max(-(-(n + n // 8) // (2 << 20)) * (2 << 20), 2 << 20)
            self.tensor = None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                self.capacity = 0
                raise CheckpointError(
                    f"cannot stage {n} bytes in {self.path.parent}: {exc.strerror}; enlarge /dev/shm (e.g. docker "
                    "--shm-size) or pass staging_dir= on a larger tmpfs"
                ) from exc
            os.close(fd)
            self.tensor = torch.from_file(str(self.path), shared=True, size=size, dtype=torch.uint8)
            self.tensor.zero_()  # touch every page now, so a save never page-faults
            self.capacity = size
        return self.tensor

    def close(self) -> None:
        self.tensor = None
        self.path.unlink(missing_ok=True)


class _StagingPool:
    """At most ``n`` staged checkpoints in flight; ``acquire`` waits for a free buffer."""

    def __init__(self, directory: Path, n: int) -> None:
        ensure_private_dir(directory.parent)
        ensure_private_dir(directory)
        self._sweep(directory)
        tag = f"ckpt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._free = [_StagingBuffer(directory / f"{tag}-{i}.buf") for i in range(n)]
        self._all = list(self._free)
        self._cond = threading.Condition()

    @staticmethod
    def _sweep(directory: Path) -> None:
        """Remove buffers left by trainers that died (their pid is in the name)."""
        for p in directory.glob("ckpt-*.buf"):
            try:
                pid = int(p.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not pid_alive(pid):
                p.unlink(missing_ok=True)

    def acquire(self) -> _StagingBuffer:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def release(self, buf: _StagingBuffer) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        for b in self._all:
            b.close()


_COPY_PIECE = 16 << 20


def _stage(staging: torch.Tensor, manifest: list[list[Any]], order: list[torch.Tensor],
           bounce: Callable[[], torch.Tensor], copiers: concurrent.futures.ThreadPoolExecutor | None) -> None:
    """Copy the tensors into the staging buffer: the only part of a save that blocks training.

    Contiguous CPU tensors are copied as raw byte ranges by ``memmove`` on ``copiers`` threads (ctypes
    releases the GIL), in pieces of up to 16 MiB, small tensors batched: a large glibc memcpy streams
    past the caches and beats ``Tensor.copy_`` by 15-20% here. Everything else goes through ``copy_``.
    """
    jobs: list[list[tuple[int, int, int]]] = [[]]
    filled = 0
    base = staging.data_ptr()
    with torch.no_grad():
        for (name, dtype, shape, b, e), t in zip(manifest, order):
            if e == b:
                continue
            if t.device.type != "cpu" or not t.is_contiguous() or copiers is None:
                _copy_into(staging[b:e].view(_DTYPES_BY_NAME[dtype]).view(shape), t, bounce)
                continue
            src = t.data_ptr()
            for off in range(0, e - b, _COPY_PIECE):
                n = min(_COPY_PIECE, e - b - off)
                jobs[-1].append((base + b + off, src + off, n))
                filled += n
                if filled >= _COPY_PIECE:
                    jobs.append([])
                    filled = 0
    if copiers is not None and jobs[0]:
        for fut in [copiers.submit(_memmove_all, j) for j in jobs if j]:
            fut.result()


def _memmove_all(job: list[tuple[int, int, int]]) -> None:
    for dst, src, n in job:
        ctypes.memmove(dst, src, n)


def _copy_into(dst: torch.Tensor, src: torch.Tensor, bounce: Callable[[], torch.Tensor]) -> None:
    """Copy ``src`` into ``dst`` (a view of the staging buffer); CUDA tensors go through pinned memory."""
    if src.device.type != "cuda":
        dst.copy_(src)
        return
    # Device-to-host at full speed needs page-locked memory: bounce through one reused pinned buffer.
    flat = src.detach().contiguous().reshape(-1).view(torch.uint8)
    out = dst.reshape(-1).view(torch.uint8)
    pinned = bounce()
    stream = torch.cuda.current_stream(src.device)
    for i in range(0, flat.numel(), pinned.numel()):
        k = min(pinned.numel(), flat.numel() - i)
        pinned[:k].copy_(flat[i:i + k], non_blocking=True)
        stream.synchronize()
        out[i:i + k].copy_(pinned[:k])


# --- writers -------------------------------------------------------------------------------------


class _LocalWriter:
    """Writes in this process, with the agent's writer code (no agent, or the agent is gone)."""

    def __init__(self, registry: Path, threads: int = 0) -> None:
        self.registry = registry
        self.threads = threads
        self._recovered = False

    def write(self, spec: dict[str, Any], on_durable: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
        if not self._recovered:
            recover_interrupted(self.registry)
            self._recovered = True
        return commit_checkpoint(spec, self.registry, threads=self.threads, on_durable=on_durable)


class _AgentWriter:
    """Sends the staged checkpoint to the agent and waits on a connection of its own (so a long write
    never holds the tracker's control connection). If the agent dies, it waits for one to come back and
    re-sends the request (the staging buffer is still intact); after ``reconnect_timeout`` it writes the
    checkpoint in this process."""

    def __init__(self, tracker: Any, local: _LocalWriter, reconnect_timeout: float = 60.0) -> None:
        self.tracker = tracker
        self.local = local
        self.reconnect_timeout = reconnect_timeout

    def write(self, spec: dict[str, Any], on_durable: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
        """The agent answers once the file is durable (its retention runs afterwards); ``on_durable`` is
        only for the in-process writer."""
        client = self.tracker._client
        if client is None:
            return self.local.write(spec)
        try:
            reply = client.request(CheckpointRequest(spec["request_id"], spec))
        except AgentUnavailable:
            return self._after_loss(spec)
        if not reply.ok:
            raise CheckpointError(f"the agent refused checkpoint {spec['path']}: {reply.error}")
        return self._wait(spec)

    def _connect(self) -> Any:
        from flightlog.proto.control import connect

        return connect(self.tracker.paths, timeout=2.0)

    def _wait(self, spec: dict[str, Any], resent: int = 0) -> dict[str, Any]:
        conn = self._connect()
        if conn is None:
            return self._after_loss(spec, resent)
        try:
            return self._wait_on(conn, spec)
        except AgentUnavailable:
            return self._after_loss(spec, resent)
        finally:
            conn.close()

    @staticmethod
    def _wait_on(conn: Any, spec: dict[str, Any]) -> dict[str, Any]:
        rid = spec["request_id"]
        while True:
            reply = conn.request(CheckpointWait(rid, timeout=20.0), timeout=40.0)
            if not reply.ok and reply.data.get("unknown"):
                reply = conn.request(CheckpointRequest(rid, spec))  # a restarted agent: send it again
                if reply.ok:
                    continue
            if reply.ok:
                return dict(reply.data)
            if not reply.data.get("pending"):
                raise CheckpointError(f"checkpoint {spec['path']} failed: {reply.error}")

    def _after_loss(self, spec: dict[str, Any], resent: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + self.reconnect_timeout
        while resent < 3 and time.monotonic() < deadline:
            conn = self._connect()
            if conn is not None:
                conn.close()
                log.warning("flightlog: the agent was lost while writing %s; re-sending it", spec["path"])
                return self._wait(spec, resent + 1)
            time.sleep(0.1)
        log.warning("flightlog: no agent to write %s; writing it in this process", spec["path"])
        return self.local.write(spec)


# --- the checkpointer ----------------------------------------------------------------------------


class ModelCheckpointer:
    """Saves, lists, chooses and loads checkpoints in ``checkpoint_dir``.

    ``save`` blocks only while tensors are copied into a shared-memory staging buffer and returns a
    PendingCheckpoint (the final path). Standalone it writes on a thread of this process and keeps its
    registry in ``checkpoint_dir/registry.db``; built with ``for_tracker`` it hands the write to the agent
    and uses the agent's store as registry.
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
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if upload not in ("none", "best", "all"):
            raise ValueError(f"upload must be 'none', 'best' or 'all', got {upload!r}")
        if max_checkpoints < 0 or keep_every_n_steps < 0 or max_in_flight < 1:
            raise ValueError("max_checkpoints and keep_every_n_steps must be >= 0, max_in_flight >= 1")
        check_level(compression, compression_level)
        self.dir = Path(checkpoint_dir).expanduser().absolute()
        self.max_checkpoints, self.keep_every_n_steps = max_checkpoints, keep_every_n_steps
        self.monitor, self.mode = monitor, mode
        self.compression, self.compression_level = compression, compression_level
        self.min_free_bytes = min_free_bytes
        self.upload = upload  # done by the agent's MLflow/W&B sinks: only through a tracker
        self.run_id, self.config_hash = run_id, config_hash
        self.registry_path = Path(registry) if registry else self.dir / STANDALONE_NAME
        self._local = _LocalWriter(self.registry_path, threads)
        self._writer: _LocalWriter | _AgentWriter = self._local
        self._pool = _StagingPool(Path(staging_dir) if staging_dir else _default_staging_dir(), max_in_flight)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="flightlog-ckpt")
        self._pending: dict[str, PendingCheckpoint] = {}
        self._jobs: list[concurrent.futures.Future[None]] = []  # writer-thread work, retention included
        self._lock = threading.Lock()
        self._bounce: torch.Tensor | None = None
        copiers = min(8, torch.get_num_threads())
        self._copiers = (concurrent.futures.ThreadPoolExecutor(copiers, thread_name_prefix="flightlog-stage")
                         if copiers > 1 else None)
        self._closed = False
        self._git = _git_commit(os.getcwd())
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
        )
        ck._writer = _AgentWriter(tracker, ck._local)
        return ck

    # --- saving --------------------------------------------------------------------------------

    def save(self, model: Any = None, epoch: int = 0, step: int = 0, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, is_best: bool | None = None, **metrics: Any) -> PendingCheckpoint:
        """Stage the training state and return its final path at once; the file appears there atomically
        when durable. Keyword arguments other than the named ones are metrics (``val_loss=0.3``)."""
        if self._closed:
            raise CheckpointError("this ModelCheckpointer is closed")
        values = {k: _metric(k, v) for k, v in metrics.items()}
        path = str(self.dir / f"ckpt-e{int(epoch):04d}-s{int(step):09d}{EXTENSIONS[self.compression]}")
        with self._lock:
            tensors, meta = self._collect(model, optimizer, scheduler, scaler)
            meta.update(epoch=int(epoch), step=int(step), metrics=values, is_best=is_best, run_id=self.run_id,
                        config_hash=self.config_hash, git_commit=self._git, created=time.time(),
                        torch=torch.__version__)
            manifest, order, aliases, total = _plan(tensors)
            meta["aliases"] = aliases
            buf = self._pool.acquire()
            try:
                staging = buf.ensure(total)
                _stage(staging, manifest, order, self._pinned, self._copiers)
                dtypes: dict[str, int] = {}
                for name, dtype, shape, b, e in manifest:
                    dtypes[dtype] = dtypes.get(dtype, 0) + e - b
                spec = {
                    "v": 1, "request_id": uuid.uuid4().hex, "path": path, "staging": str(buf.path),
                    "data_bytes": total, "tensors": manifest,
                    "metadata": {"format": FORMAT_TAG, "epoch": str(int(epoch)), "step": str(int(step)),
                                 "flightlog": json.dumps(meta, separators=(",", ":"))},
                    "codec": self.compression, "level": self.compression_level, "epoch": int(epoch),
                    "step": int(step), "metrics": values, "is_best": is_best, "dtypes": dtypes,
                    "retention": {"max_checkpoints": self.max_checkpoints, "keep_every_n_steps": self.keep_every_n_steps,
                                  "monitor": self.monitor, "mode": self.mode},
                    "min_free_bytes": self.min_free_bytes, "run_id": self.run_id, "config_hash": self.config_hash,
                    "git_commit": self._git, "created": meta["created"], "upload": self.upload,
                }
                future: concurrent.futures.Future[CheckpointMetadata] = concurrent.futures.Future()
                self._jobs = [j for j in self._jobs if not j.done()]
                self._jobs.append(self._executor.submit(self._write, spec, buf, future))
            except BaseException:
                self._pool.release(buf)
                raise
            pending = PendingCheckpoint(path, future)
            self._pending[path] = pending
        future.add_done_callback(functools.partial(_report, path))
        return pending

    def _pinned(self) -> torch.Tensor:
        if self._bounce is None:
            self._bounce = torch.empty(_BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True)
        return self._bounce

    def _write(self, spec: dict[str, Any], buf: _StagingBuffer,
               future: concurrent.futures.Future[CheckpointMetadata]) -> None:
        """Runs on the writer thread; resolves ``future`` (and frees the staging buffer) the moment the
        checkpoint is durable, before retention's deletions."""
        released = False

        def durable(row: dict[str, Any]) -> None:
            nonlocal released
            self._pool.release(buf)
            released = True
            future.set_result(CheckpointMetadata.from_row(row))

        try:
            row = self._writer.write(spec, on_durable=durable)
            if not future.done():
                future.set_result(CheckpointMetadata.from_row(row))
        except BaseException as exc:
            if future.done():  # durable already; only the clean-up after it failed
                log.warning("flightlog: after checkpoint %s: %s", spec["path"], exc)
            elif isinstance(exc, CheckpointError):
                future.set_exception(exc)
            elif isinstance(exc, FlightlogError):
                future.set_exception(CheckpointError(f"checkpoint {spec['path']} failed: {exc}"))
            else:
                future.set_exception(CheckpointError(f"checkpoint {spec['path']} failed unexpectedly: {exc!r}"))
        finally:
            if not released:
                self._pool.release(buf)

    @staticmethod
    def _collect(model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        if model is not None:
            sd = model if isinstance(model, Mapping) else model.state_dict()
            extra = {}
            for name, value in sd.items():
                if name.startswith("@"):
                    raise CheckpointError(f"model state key {name!r}: names starting with '@' are reserved")
                if isinstance(value, torch.Tensor):
                    tensors[name] = value
                else:
                    extra[name] = _encode(value, f"model/{name}", tensors)
            meta["model_extra"] = extra
        for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None:
                meta[key] = _encode(obj.state_dict(), key, tensors)
        meta["rng"] = _encode(_rng_state(), "rng", tensors)
        return tensors, meta

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

    def list(self) -> list[CheckpointMetadata]:
        """Durable checkpoints of this directory, oldest first."""
        self._settle()
        reg = self._registry()
        if reg is None:
            return []
        with reg:
            return [CheckpointMetadata.from_row(r) for r in reg.entries(str(self.dir))]

    def best(self) -> str | None:
        """Path of the best checkpoint (by ``is_best=`` or the monitored metric), or None."""
        self._settle()
        reg = self._registry()
        if reg is None:
            return None
        with reg:
            row = reg.best(str(self.dir))
        return row["path"] if row else None

    def latest(self) -> str | None:
        self._settle()
        reg = self._registry()
        if reg is None:
            return None
        with reg:
            row = reg.latest(str(self.dir))
        return row["path"] if row else None

    # --- loading -------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike[str] = "latest", model: Any = None, optimizer: Any = None,
             scheduler: Any = None, scaler: Any = None, *, fallback: bool = False, map_location: Any = "cpu",
             strict: bool = True, restore_rng: bool = True) -> tuple[int, int]:
        """Verify and restore a checkpoint ("best", "latest", or a path; a pending one is waited for).
        Returns (epoch, step). A damaged file raises CheckpointCorrupt naming it; with ``fallback=True`` the
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
            with self._lock:
                pending = self._pending.get(str(Path(target).absolute()))
            if pending is not None:
                pending.wait()
        candidates = self._candidates(target, fallback)
        into = _in_place_targets(model, optimizer, scheduler, scaler) if map_location in (None, "cpu") else {}
        errors: list[str] = []
        for cand, checksum in candidates:
            try:
                with CheckpointReader(cand, verify=False, expected_checksum=checksum) as reader:
                    state = _read_state(reader, map_location, into)
            except CheckpointError as exc:
                if not fallback:
                    raise
                log.warning("flightlog: skipping checkpoint %s: %s", cand, exc)
                errors.append(str(exc))
                continue
            return _apply(state, model, optimizer, scheduler, scaler, strict, restore_rng)
        if errors:
            raise CheckpointCorrupt(f"no valid checkpoint in {self.dir}: " + "; ".join(errors))
        raise CheckpointError(f"no checkpoint to load for {target!r} in {self.dir}")

    def _candidates(self, target: str, fallback: bool) -> list[tuple[str, str | None]]:
        """(path, registered checksum) to try in order: the target, then (fallback) older ones."""
        reg = self._registry()
        rows: list[dict[str, Any]] = []
        chosen: dict[str, Any] | None = None
        if reg is not None:
            with reg:
                rows = reg.entries(str(self.dir))[::-1]  # newest first
                if target not in ("best", "latest"):
                    chosen = reg.get(str(Path(target).absolute()))
        if target == "latest":
            chosen = rows[0] if rows else None
        elif target == "best":
            chosen = next((r for r in rows if r["is_best"]), None)
        if target in ("best", "latest") and chosen is None:
            raise CheckpointError(f"no {target} checkpoint registered for {self.dir}")
        if chosen is None or chosen["state"] != "done":
            first: tuple[str, str | None] = (str(Path(target).absolute()), None)
            return [first] + ([(r["path"], r["checksum"]) for r in rows if r["path"] != first[0]] if fallback else [])
        out: list[tuple[str, str | None]] = [(chosen["path"], chosen["checksum"])]
        if fallback:
            out += [(r["path"], r["checksum"]) for r in rows
                    if r["path"] != chosen["path"] and (target == "best" or r["seq"] < chosen["seq"])]
        return out

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
    def _cleanup(pool: _StagingPool) -> None:
        pool.close()

    def __enter__(self) -> ModelCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _report(path: str, future: concurrent.futures.Future[CheckpointMetadata]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("flightlog: checkpoint %s failed (training continues): %s", path, exc)


def _plan(tensors: Mapping[str, torch.Tensor]) -> tuple[list[list[Any]], list[torch.Tensor], dict[str, str], int]:
    """Deduplicate exact aliases (tied weights), order by element size (so every tensor is aligned),
    and lay the tensors out back to back: returns (manifest rows, tensors in row order, aliases, bytes)."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    unique: list[tuple[str, torch.Tensor, str]] = []
    for name, t in tensors.items():
        if t.layout != torch.strided:
            raise CheckpointError(f"tensor {name!r} has layout {t.layout}; only dense tensors are stored")
        dtype = _TORCH_DTYPES.get(t.dtype)
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        if t.numel():
            key = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        unique.append((name, t, dtype))
    unique.sort(key=lambda u: (-DTYPE_SIZES[u[2]], u[0]))
    manifest, order, pos = [], [], 0
    for name, t, dtype in unique:
        n = t.numel() * DTYPE_SIZES[dtype]
        manifest.append([name, dtype, list(t.shape), pos, pos + n])
        order.append(t)
        pos += n
    return manifest, order, aliases, pos


def _in_place_targets(model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> dict[str, torch.Tensor]:
    """The tensors the objects being loaded into already hold, under the names a save gives them."""
    try:
        tensors, _ = ModelCheckpointer._collect(model, optimizer, scheduler, scaler)
    except (CheckpointError, RuntimeError, TypeError, AttributeError):
        return {}  # something odd about the targets: load everything into fresh memory instead
    return tensors


def _read_state(reader: CheckpointReader, map_location: Any, into: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Decompress and verify the checkpoint. Tensors whose target (``into``: a model parameter, existing
    optimizer state) has the same dtype and shape are loaded straight into it, each piece only after its
    frame's checksum passed; the rest go to fresh memory. The file's checksum runs alongside and is
    checked before anything is applied."""
    try:
        meta = json.loads(reader.metadata["flightlog"])
    except (KeyError, ValueError) as exc:
        raise CheckpointCorrupt(f"{reader.path}: no flightlog metadata in the safetensors header") from exc
    in_place: dict[str, torch.Tensor] = {}
    for info in reader.tensors.values():
        t = into.get(info.name)
        if (t is not None and t.device.type == "cpu" and t.dtype == _DTYPES_BY_NAME[info.dtype]
                and tuple(t.shape) == info.shape and t.is_contiguous() and t.numel()):
            in_place[info.name] = t
    data = reader.read_data(verify=True, in_place={k: t.data_ptr() for k, t in in_place.items()})
    base = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for info in reader.tensors.values():
        dtype = _DTYPES_BY_NAME[info.dtype]
        if info.name in in_place:
            t = in_place[info.name]
        elif info.end == info.begin:
            t = torch.empty(info.shape, dtype=dtype)
        else:
            raw = base[info.begin:info.end]
            if info.begin % DTYPE_SIZES[info.dtype]:
                raw = raw.clone()
            t = raw.view(dtype).view(info.shape)
        tensors[info.name] = t if map_location in (None, "cpu") else t.to(map_location)
    for alias, target in meta.get("aliases", {}).items():
        tensors[alias] = tensors[target]
    meta["_tensors"] = tensors
    return dict(meta)


def _apply(state: dict[str, Any], model: Any, optimizer: Any, scheduler: Any, scaler: Any, strict: bool,
           restore_rng: bool) -> tuple[int, int]:
    tensors = state["_tensors"]
    if model is not None:
        sd: dict[str, Any] = {k: v for k, v in tensors.items() if not k.startswith("@")}
        sd.update({k: _decode(v, tensors) for k, v in state.get("model_extra", {}).items()})
        model.load_state_dict(sd, strict=strict)
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if key not in state:
            raise CheckpointError(f"the checkpoint holds no {key} state, but a {key} was given to load into")
        obj.load_state_dict(_decode(state[key], tensors))
    if restore_rng and "rng" in state:
        _set_rng_state(_decode(state["rng"], tensors))
    return int(state["epoch"]), int(state["step"])

