"""ExperimentTracker: a thin facade over the config, the run's metadata, the ring producer and the agent."""
from __future__ import annotations

import atexit
import hashlib
import logging
import operator
import os
import platform
import shutil
import socket as _socket
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from flightlog import capture as _capture
from flightlog.client import AgentClient, connect_or_start
from flightlog.proto.config import Config, config_hash, config_to_dict, load_config
from flightlog.proto.paths import resolve_paths
from flightlog.proto.codec import event_encoder
from flightlog.proto.errors import AgentUnavailable, FlightlogError
from flightlog.progress import NEVER, Progress
from flightlog.proto.events import (
    Artifact,
    Event,
    EventBatch,
    FlushRequest,
    Histogram,
    HyperParams,
    Image,
    Metrics,
    Register,
    RunEnd,
    RunStart,
    Tags,
    Text,
    Unregister,
)
from flightlog.proto.frames import append_frame
from flightlog.ring import RingProducer, ring_supported

__all__ = ["ExperimentTracker", "ExperimentMetadata", "experiment_tracking"]

log = logging.getLogger("flightlog")

_STATUSES = ("running", "completed", "failed", "killed")
_now = time.time


class ExperimentMetadata(msgspec.Struct, kw_only=True):
    """What identifies and describes one run."""

    id: str
    name: str
    description: str = ""
    tags: list[str] = []
    created_at: float = 0.0
    ended_at: float | None = None
    status: str = "running"
    error: str = ""
    config: dict[str, Any] = {}
    config_hash: str = ""
    host: str = ""
    pid: int = 0
    rank: int = 0
    environment: dict[str, Any] = {}  # python, OS, host, CPU, RAM, GPUs, packages, allow-listed env vars
    git: dict[str, Any] = {}  # commit, branch, dirty, remote_url (no credentials), diff_bytes, diff_artifact
    command: dict[str, Any] = {}  # argv (secrets masked), cwd, executable
    seed: dict[str, Any] = {}  # what flightlog.seed_everything did
    total_steps: int | None = None


def _coerce_metrics(metrics: Any) -> dict[str, float | int]:
    """Slow path of log_metrics: a clear TypeError, or numbers converted (bool, numpy, 0-dim tensors)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"log_metrics expects a dict of name -> number, got {type(metrics).__name__}")
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if type(key) is not str:
            raise TypeError(f"metric names must be str, got {key!r} ({type(key).__name__})")
        if type(value) is float or type(value) is int:
            out[key] = value
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(
                f"metric {key!r} must be a number, got {type(value).__name__}: {value!r:.80}; "
                "log text with log_text()"
            )
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor with more than one element
            raise TypeError(f"metric {key!r} cannot be converted to a number: {exc}") from exc
    return out


def _absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as the agent must see it: relative paths resolved against this process's cwd."""
    t = dict(cfg["tracking"])
    for key in ("tensorboard_log_dir", "wandb_dir"):
        if t.get(key):
            t[key] = os.path.abspath(t[key])
    uri = t.get("mlflow_tracking_uri") or ""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        t["mlflow_tracking_uri"] = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif uri and "://" not in uri:  # a plain local path is a file store
        t["mlflow_tracking_uri"] = os.path.abspath(uri)
    c = dict(cfg["checkpointing"])
    c["checkpoint_dir"] = os.path.abspath(c["checkpoint_dir"])
    return {**cfg, "tracking": t, "checkpointing": c}


def _default_rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


class ExperimentTracker:
    """Logs one run. ``log_metrics`` encodes an event and copies it into a shared-memory ring.

    ``log_metrics`` is not thread-safe (it is lock-free): log from one thread, or give each logging thread
    its own tracker. The other methods take a lock.
    """

    def __init__(
        self,
        name: str,
        config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        description: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
        rank: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("experiment name must be a non-empty string")
        self.config: Config = load_config(config)
        cfg = self.config
        self.rank = _default_rank() if rank is None else rank
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.metadata = ExperimentMetadata(
            id=self.run_id,
            name=name,
            description=cfg.description if description is None else description,
            tags=list(cfg.tags if tags is None else tags),
            created_at=time.time(),
            config=_capture.redact(config_to_dict(cfg)),  # secrets never reach the WAL; the hash is of the real one
            config_hash=config_hash(cfg),
            host=_socket.gethostname(),
            pid=os.getpid(),
            rank=self.rank,
        )
        git_diff = self._capture_run_info()
        self.paths = resolve_paths(cfg.agent.data_dir, cfg.agent.socket)
        self._lock = threading.Lock()
        self._finished = False
        self._client: AgentClient | None = None
        self._ckpt: Any = None
        self._pending = bytearray()  # socket fallback only
        self._pending_count = 0
        self._step = -1
        self._warned_backwards = False
        self._progress: Progress | None = None
        self._progress_next = NEVER  # log_metrics' one extra comparison: progress off
        self._producer = self._open_producer()
        self._buf = bytearray(512)  # reused: encode_into resizes it to each payload
        self._encode_into = event_encoder.encode_into
        self._write = self._producer.write_frame if self._producer else self._write_via_socket
        self._connect()
        self._emit(
            RunStart(
                run_id=self.run_id, name=name, timestamp=self.metadata.created_at,
                description=self.metadata.description, tags=self.metadata.tags,
                config=_absolute_paths(self.metadata.config), config_hash=self.metadata.config_hash,
                sinks=self._sinks(), pid=os.getpid(), rank=self.rank, host=self.metadata.host,
                metadata=self._run_metadata(),
            )
        )
        if git_diff:
            self._save_git_diff(git_diff)
        _capture._listen_for_seed(self)
        if total_steps is not None:
            self.progress(total_steps)
        atexit.register(self._atexit)

    # --- setup -----------------------------------------------------------------------------------

    def _sinks(self) -> list[str]:
        t = self.config.tracking
        sinks = ["store"]
        if t.use_tensorboard:
            sinks.append("tensorboard")
        if t.use_mlflow:
            sinks.append("mlflow")
        if t.use_wandb:
            sinks.append("wandb")
        return sinks

    def _open_producer(self) -> RingProducer | None:
        self.producer_id = f"{self.run_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not ring_supported():
            log.info("flightlog: no shared-memory ring on this CPU (%s); events go to the agent over its "
                     "socket, in batches", platform.machine())
            return None
        a = self.config.agent
        return RingProducer(
            self.paths.ring_dir / f"{self.producer_id}.ring", a.ring_bytes, self.producer_id,
            self.paths.spill_dir, rank=self.rank, on_full=a.on_full, block_timeout=a.block_timeout_seconds,
        )

    def _agent_settings(self) -> dict[str, Any]:
        d = config_to_dict(self.config)
        return {"agent": d["agent"], "wal": d["wal"]}

    def _connect(self) -> None:
        a = self.config.agent
        try:
            self._client = connect_or_start(
                self.paths, self._agent_settings(), autostart=a.autostart, timeout=a.connect_timeout_seconds
            )
        except AgentUnavailable as exc:
            # Training goes on: events wait in the ring and spill file until an agent drains them.
            log.warning("flightlog: %s; events are kept in %s until an agent runs", exc, self.paths.ring_dir)
            self._client = None
        if self._client is None:
            if self._producer is None:
                raise AgentUnavailable(
                    f"no flightlog agent on {self.paths.socket} and this CPU has no shared-memory ring; "
                    "start one with `flightlog agent`"
                )
            log.warning("flightlog: no agent on %s yet; logging into %s", self.paths.socket, self.paths.ring_dir)
            return
        ring_path = str(self._producer.path) if self._producer is not None else ""
        self._client.request(
            Register(producer_id=self.producer_id, ring_path=ring_path, pid=os.getpid(), rank=self.rank,
                     run_id=self.run_id)
        )

    # --- logging ---------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numbers at a step (default: the previous step + 1). NaN and ±inf are logged as they are.

        A step lower than the previous one is recorded as given (one warning per run).
        """
        try:
            for k, v in metrics.items():
                if (type(v) is not float and type(v) is not int) or type(k) is not str:
                    metrics = _coerce_metrics(metrics)
                    break
        except AttributeError:
            metrics = _coerce_metrics(metrics)  # not a mapping: raises a clear TypeError
        if step is None:
            step = self._step + 1
        elif type(step) is not int or step < self._step:
            step = self._check_step(step)
        self._step = step
        buf = self._buf
        self._encode_into(Metrics(self.run_id, step, _now(), metrics), buf, 0)
        self._write(buf)
        if step >= self._progress_next:  # progress off: never true; on: about every 0.5 s
            self._progress_tick(step)

    def _check_step(self, step: Any) -> int:
        try:
            step = operator.index(step)  # ints, numpy integers, 0-dim integer tensors
        except TypeError:
            raise TypeError(f"step must be an int, got {type(step).__name__}: {step!r:.40}") from None
        if step < self._step and not self._warned_backwards:
            self._warned_backwards = True
            log.warning("flightlog: step went backwards (%d after %d); points are recorded as given",
                        step, self._step)
        return int(step)

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        """Log hyper-parameters (values: numbers, strings, bools, None, or nested lists/dicts)."""
        if not isinstance(params, Mapping):
            raise TypeError(f"log_hyperparameters expects a dict, got {type(params).__name__}")
        clean = _capture.redact({str(k): v for k, v in params.items()})
        try:
            msgspec.msgpack.encode(clean)
        except TypeError as exc:
            raise TypeError(f"hyper-parameters must be plain data (numbers, strings, lists, dicts): {exc}") from exc
        self._emit(HyperParams(self.run_id, clean, time.time()))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._emit(Tags(self.run_id, _capture.redact({str(k): str(v) for k, v in tags.items()}), time.time()))

    def log_text(self, key: str, text: str, step: int | None = None) -> None:
        self._emit(Text(self.run_id, key, str(text), self._step if step is None else step, time.time()))

    def _emit(self, event: Event) -> None:
        with self._lock:
            self._encode_into(event, self._buf, 0)
            self._write(self._buf)

    # --- checkpoints (flightlog.checkpoint, imported on first use: it needs torch) ---------------

    def _checkpointer(self) -> Any:
        if self._ckpt is None:
            from flightlog.checkpoint import ModelCheckpointer

            self._ckpt = ModelCheckpointer.for_tracker(self)
        return self._ckpt

    def save_checkpoint(self, model: Any = None, epoch: int = 0, step: int = 0, optimizer: Any = None,
                        **kwargs: Any) -> Any:
        """Stage the state into shared memory and return the final path at once (a str with ``.wait()``).

        Keyword arguments: ``scheduler=``, ``scaler=``, ``is_best=``, and any metrics (``val_loss=...``).
        """
        return self._checkpointer().save(model, epoch, step, optimizer, **kwargs)

    def get_best_checkpoint(self) -> str | None:
        return self._checkpointer().best()  # type: ignore[no-any-return]

    def load_checkpoint(self, path: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> tuple[int, int]:
        """Restore state from ``path`` ("best", "latest" or a file); returns (epoch, step)."""
        return self._checkpointer().load(path, model, optimizer, **kwargs)  # type: ignore[no-any-return]

    def should_checkpoint(self, step: int) -> bool:
        """True every ``checkpointing.save_frequency`` steps (never when it is 0)."""
        freq = self.config.checkpointing.save_frequency
        return freq > 0 and step > 0 and step % freq == 0

    # --- the socket fallback (CPUs without the ring's store ordering) -----------------------------

    def _write_via_socket(self, payload: bytearray) -> None:
        """Batch frames in memory and send them to the agent every 64 KiB and at flush.

        Weaker than the ring: events not yet sent are lost if the trainer dies, and a batch re-sent after
        an agent crash may be ingested twice. Documented in the README.
        """
        append_frame(self._pending, bytes(payload))
        self._pending_count += 1
        if len(self._pending) >= 64 << 10:
            self._send_pending()

    def _send_pending(self) -> None:
        if not self._pending_count:
            return
        reply = self._request(EventBatch(self.producer_id, bytes(self._pending), self._pending_count))
        if not reply.ok:
            raise FlightlogError(f"the agent refused a batch of events: {reply.error}")
        self._pending.clear()
        self._pending_count = 0

    # --- durability and lifecycle ----------------------------------------------------------------

    def flush(self, timeout: float = 60.0) -> None:
        """Return once everything logged so far is in the agent's WAL and fsynced, and every checkpoint
        saved so far is durable."""
        if self._ckpt is not None:
            self._ckpt.wait_all(timeout)
        if self._producer is None:
            with self._lock:
                self._send_pending()
            return
        w, gen, spill_pos = self._producer.positions()
        reply = self._request(FlushRequest(self.producer_id, w, gen, spill_pos, timeout), timeout + 5)
        if not reply.ok:
            raise FlightlogError(f"flush failed: {reply.error}")

    def _request(self, message: Any, timeout: float = 30.0) -> Any:
        """A control request; reconnects once (an agent restarted after a crash is found again)."""
        for attempt in (1, 2):
            if self._client is None:
                self._connect()
                if self._client is None:
                    raise AgentUnavailable(
                        f"no flightlog agent on {self.paths.socket}; start one with `flightlog agent` "
                        "(events logged so far are kept in shared memory and spill files until then)"
                    )
            try:
                return self._client.request(message, timeout=timeout)
            except AgentUnavailable:
                self._client.close()
                self._client = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def finish(self, status: str = "completed", error: str = "") -> None:
        """End the run: record its status, make every event durable, release the ring."""
        if self._finished:
            return
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        self._finished = True
        self.metadata.status = status
        self.metadata.error = error
        self.metadata.ended_at = time.time()
        dropped = self._producer.dropped if self._producer else 0
        if dropped:
            log.warning("flightlog: %d events were dropped because the ring was full (agent.on_full=drop)", dropped)
        if self._progress is not None:
            self._progress.close()
            self._progress, self._progress_next = None, NEVER
        self._emit(RunEnd(self.run_id, status, self.metadata.ended_at, error, dropped))
        try:
            if self._client is None:
                self._connect()  # an agent may have come up since (or autostart starts one now)
            if self._client is not None:
                self.flush()
            if self._client is not None:
                self._client.request(Unregister(self.producer_id))
        except FlightlogError as exc:
            log.warning("flightlog: could not confirm the end of run %s with the agent: %s", self.run_id, exc)
        finally:
            if self._ckpt is not None:
                self._ckpt.close()  # waits for checkpoint writes still running, frees the staging buffers
            if self._client is not None:
                self._client.close()
            if self._producer is not None:
                self._producer.close()
            atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        if not self._finished:
            self.finish("completed")

    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("killed", "KeyboardInterrupt")
        else:
            self.finish("failed", "".join(traceback.format_exception(exc_type, exc, tb)))

    # --- reproducibility capture (flightlog.capture) ------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """This run's directory in the agent's data directory (artifacts, plots)."""
        return self.paths.data_dir / "runs" / self.run_id

    def _capture_run_info(self) -> str:
        """Fill the metadata's environment, git, command and seed; returns the uncommitted git diff."""
        md = self.metadata
        try:
            md.environment = _capture.capture_environment()
            md.command = _capture.capture_command()
            md.git, diff = _capture.capture_git()
        except Exception as exc:  # capture is best effort: it must never stop a run from starting
            log.warning("flightlog: reproducibility capture incomplete: %r", exc)
            diff = ""
        md.seed = _capture.last_seed()
        return diff

    def _run_metadata(self) -> dict[str, Any]:
        md = self.metadata
        info = {"environment": md.environment, "git": md.git, "command": md.command, "seed": md.seed}
        return _capture.redact(msgspec.to_builtins(info, enc_hook=str))  # plain data only on the wire

    def _save_git_diff(self, diff: str) -> None:
        try:
            path = self.run_dir / "artifacts" / "git_diff.patch"
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            data = diff.encode()
            path.write_bytes(data)
            self.metadata.git["diff_artifact"] = str(path)
            self._emit(Artifact(self.run_id, "git_diff.patch", str(path), time.time(), "git-diff",
                                "sha256:" + hashlib.sha256(data).hexdigest(), len(data)))
        except OSError as exc:
            log.warning("flightlog: could not save the uncommitted git diff: %s", exc)

    def _record_seed(self, info: dict[str, Any]) -> None:
        """Called by flightlog.seed_everything while this run is alive."""
        if self._finished:
            return
        self.metadata.seed = info
        self._emit(HyperParams(self.run_id, {"seed": info["seed"], "deterministic": info["deterministic"]},
                               time.time()))

    # --- progress and ETA (flightlog.progress) --------------------------------------------------------

    def progress(self, total_steps: int) -> None:
        """Track progress towards ``total_steps``: a bar on a terminal (rank 0 only), and the metrics
        ``progress/eta_seconds`` and ``progress/steps_per_second``, from the steps log_metrics sees."""
        if self._progress is not None:
            self._progress.close()
        self._progress = Progress(total_steps, bar=None if self.rank == 0 else False)
        self.metadata.total_steps = total_steps
        self._progress_next = 0

    def _progress_tick(self, step: int) -> None:
        p = self._progress
        if p is None:
            self._progress_next = NEVER
            return
        try:
            self._progress_next, metrics = p.tick(step)
            if metrics is not None:
                self._emit(Metrics(self.run_id, step, _now(), metrics))
        except Exception as exc:  # a broken terminal must not stop training
            log.warning("flightlog: progress display disabled: %r", exc)
            self._progress, self._progress_next = None, NEVER

    # --- artifacts ----------------------------------------------------------------------------------

    def log_artifact(self, path: str | os.PathLike[str], name: str | None = None, type: str | None = None) -> Path:
        """Copy a file or directory into the run's directory, with a sha256, and hand it to the sinks.

        Returns the copy's path. A second artifact of the same name replaces the first.
        """
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"log_artifact: {src} does not exist")
        name = name or src.name
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise ValueError(f"artifact name must be a plain file name, got {name!r}")
        dest_dir = self.run_dir / "artifacts"
        dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        dest = dest_dir / name
        tmp = dest_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        if src.is_dir():
            shutil.copytree(src, tmp, symlinks=True)
        else:
            shutil.copyfile(src, tmp)
        checksum, size = _sha256_tree(tmp)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        self._emit(Artifact(self.run_id, name, str(dest), time.time(), type or ("dir" if src.is_dir() else "file"),
                            checksum, size))
        return dest

    # --- visualisation (flightlog.viz: imports torch on first use) --------------------------------------

    def _at(self, step: int | None) -> int:
        return max(self._step, 0) if step is None else int(step)

    def log_gradient_flow(self, model: Any, step: int | None = None, *, plot: bool = True) -> dict[str, float]:
        """Per-layer gradient L2 norms as ``grad_norm/<param>`` metrics, and (``plot=True``) a gradient-flow
        bar chart as the image ``gradient_flow``. Call after ``backward()``; does not move the step."""
        from flightlog import viz

        step = self._at(step)
        norms = viz.gradient_norms(model)
        if norms:
            self._emit(Metrics(self.run_id, step, _now(), norms))
        if plot:
            png = viz.gradient_flow_png(model)
            if png is not None:
                self._emit(Image(self.run_id, "gradient_flow", step, _now(), "", png))
        return norms

    def log_histograms(self, model: Any, step: int | None = None, *, bins: int = 64,
                       gradients: bool = True) -> int:
        """``weights/<param>`` and ``gradients/<param>`` histograms; returns how many were logged."""
        from flightlog import viz

        return self._emit_histograms(viz.parameter_histograms(model, bins=bins, gradients=gradients),
                                     self._at(step))

    def log_data_distribution(self, batch: Any, step: int | None = None, *, bins: int = 64) -> int:
        """``data/<name>`` histograms (and ``data/<name>/mean``, ``/std`` metrics) of a batch's tensors."""
        from flightlog import viz

        step = self._at(step)
        hists = viz.data_distribution(batch, bins=bins)
        stats = {f"{key}/{k}": v for key, h in hists for k, v in h.extra.items()}
        if stats:
            self._emit(Metrics(self.run_id, step, _now(), stats))
        return self._emit_histograms(hists, step)

    def _emit_histograms(self, hists: Any, step: int) -> int:
        n = 0
        for key, h in hists:
            self._emit(Histogram(self.run_id, key, step, _now(), h.bucket_limits, h.bucket_counts, h.min, h.max,
                                 h.count, h.sum, h.sum_squares))
            n += 1
        return n

    def log_model_summary(self, model: Any) -> str:
        """The model's layers and parameter counts as the text ``model/summary``; counts as parameters."""
        from flightlog import viz

        text, counts = viz.model_summary(model)
        self._emit(Text(self.run_id, "model/summary", text, max(self._step, 0), time.time()))
        self._emit(HyperParams(self.run_id, {f"model/{k}": v for k, v in counts.items()}, time.time()))
        return text

    def memory_stats(self, *, log: bool = True) -> dict[str, float]:
        """CUDA memory of this process per device (allocated, max allocated, reserved, max reserved bytes),
        logged as ``memory/cuda:<i>/...`` metrics at the current step. {} when torch is not loaded or has
        no GPU (torch is never imported here)."""
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return {}
        out: dict[str, float] = {}
        for i in range(torch.cuda.device_count()):
            p = f"memory/cuda:{i}/"
            out[p + "allocated_bytes"] = float(torch.cuda.memory_allocated(i))
            out[p + "max_allocated_bytes"] = float(torch.cuda.max_memory_allocated(i))
            out[p + "reserved_bytes"] = float(torch.cuda.memory_reserved(i))
            out[p + "max_reserved_bytes"] = float(torch.cuda.max_memory_reserved(i))
        if log and out:
            self._emit(Metrics(self.run_id, max(self._step, 0), _now(), out))
        return out


def _sha256_tree(path: Path) -> tuple[str, int]:
    """sha256 of a file, or of a directory's (relative path, file sha256) list; and the total size."""
    def file_hash(p: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n

    if not path.is_dir():
        digest, size = file_hash(path)
        return "sha256:" + digest, size
    outer = hashlib.sha256()
    total = 0
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.is_symlink()):
        digest, size = file_hash(p)
        outer.update(f"{p.relative_to(path).as_posix()}\0{digest}\n".encode())
        total += size
    return "sha256:" + outer.hexdigest(), total


@contextmanager
def experiment_tracking(
    name: str, config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None, **kwargs: Any
) -> Iterator[ExperimentTracker]:
    """``with experiment_tracking(name, config) as tracker:`` — completed on exit, failed (+traceback) on error."""
    tracker = ExperimentTracker(name, config, **kwargs)
    with tracker:
        yield tracker
