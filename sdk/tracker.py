"""ExperimentTracker: a thin facade over the config, the run's metadata, the ring producer and the agent."""
from __future__ import annotations

import atexit
import logging
import operator
import os
import platform
import socket as _socket
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgspec

from flightlog.client import AgentClient, connect_or_start
from flightlog.config import Config, config_hash, config_to_dict, load_config
from flightlog.paths import resolve_paths
from flightlog.proto.codec import event_encoder
from flightlog.proto.errors import AgentUnavailable, FlightlogError
from flightlog.proto.events import (
    Event,
    EventBatch,
    FlushRequest,
    HyperParams,
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
            config=config_to_dict(cfg),
            config_hash=config_hash(cfg),
            host=_socket.gethostname(),
            pid=os.getpid(),
            rank=self.rank,
        )
        self.paths = resolve_paths(cfg.agent.data_dir, cfg.agent.socket)
        self._lock = threading.Lock()
        self._finished = False
        self._client: AgentClient | None = None
        self._ckpt: Any = None
        self._pending = bytearray()  # socket fallback only
        self._pending_count = 0
        self._step = -1
        self._warned_backwards = False
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
            )
        )
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
        clean = {str(k): v for k, v in params.items()}
        try:
            msgspec.msgpack.encode(clean)
        except TypeError as exc:
            raise TypeError(f"hyper-parameters must be plain data (numbers, strings, lists, dicts): {exc}") from exc
        self._emit(HyperParams(self.run_id, clean, time.time()))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._emit(Tags(self.run_id, {str(k): str(v) for k, v in tags.items()}, time.time()))

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


@contextmanager
def experiment_tracking(
    name: str, config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None, **kwargs: Any
) -> Iterator[ExperimentTracker]:
    """``with experiment_tracking(name, config) as tracker:`` — completed on exit, failed (+traceback) on error."""
    tracker = ExperimentTracker(name, config, **kwargs)
    with tracker:
        yield tracker
