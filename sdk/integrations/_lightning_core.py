"""The Lightning logger and CheckpointIO, written once for both import paths: ``flightlog.integrations.lightning``
and ``flightlog.integrations.pytorch_lightning`` put these mixins on their package's own base classes (each
Trainer checks ``isinstance`` against its own package's ``Logger`` and ``CheckpointIO``)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flightlog.checkpoint import ModelCheckpointer, PendingCheckpoint
from flightlog.integrations._common import STATUS, ConfigSource, LazyRun, numbers, plain, tracks_this_rank
from flightlog.proto.checkpoint.registry import STANDALONE_NAME, Registry
from flightlog.proto.config import load_config
from flightlog.proto.paths import resolve_paths
from flightlog.tracker import ExperimentTracker, exit_status

__all__ = ["LoggerCore", "CheckpointIOCore", "active_logger", "reset_active"]

log = logging.getLogger("flightlog")

#: The FlightlogLogger made last in this process: a FlightlogCheckpointIO without a tracker of its own
#: writes into that logger's run (Lightning gives a CheckpointIO no handle on the trainer's loggers).
_active: weakref.ref[LoggerCore] | None = None


def active_logger() -> LoggerCore | None:
    return _active() if _active is not None else None


def reset_active() -> None:
    """Forget the active logger (tests; a script that builds loggers it does not use)."""
    global _active
    _active = None


def _framework_rank() -> int:
    # lightning and pytorch_lightning both set this one object (lightning_utilities, a dependency of each)
    from lightning_utilities.core.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


class LoggerCore:
    """Lightning's ``Logger`` API onto one flightlog run (see ``flightlog.integrations.lightning``)."""

    _dummy: Any = None  # the package's DummyExperiment class, set by the concrete subclass

    def __init__(self, name: str = "lightning", config: ConfigSource = None, *, upload_checkpoints: bool = True,
                 **tracker_options: Any) -> None:
        super().__init__()
        self._run = LazyRun(name, config, tracker_options)
        self._upload = upload_checkpoints
        self._uploaded: dict[str, float] = {}  # checkpoint file -> mtime when it was logged as an artifact
        self._ios: weakref.WeakSet[CheckpointIOCore] = weakref.WeakSet()
        self._lock = threading.Lock()
        global _active
        _active = weakref.ref(self)

    # --- Lightning's properties ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._run.name

    @property
    def version(self) -> str:
        """The flightlog run id (Lightning names the default checkpoint folder after it); asking for it
        starts the run, as Lightning's own loggers do, unless its id is known already."""
        if self._run.run_id is not None:
            return self._run.run_id
        tracker = self.tracker
        return tracker.run_id if tracker is not None else ""

    @property
    def save_dir(self) -> str:
        """``checkpointing.checkpoint_dir``: ModelCheckpoint's default folder is ``save_dir/name/version/checkpoints``."""
        return str(Path(self._run.config.checkpointing.checkpoint_dir).expanduser().absolute())

    @property
    def log_dir(self) -> str:
        return os.path.join(self.save_dir, self.name, self.version)

    @property
    def tracker(self) -> ExperimentTracker | None:
        """This process's tracker of the run (started on first use), or None on a rank that does not log."""
        running = self._run.tracker
        if running is not None:
            return running  # every log call comes here: no environment look-up once the run is up
        if not tracks_this_rank(_framework_rank()):
            return None
        with self._lock:
            return self._run.get()

    @property
    def experiment(self) -> Any:
        """The ``flightlog.ExperimentTracker`` (a no-op stand-in on ranks that do not log)."""
        tracker = self.tracker
        return tracker if tracker is not None else self._dummy()

    # --- logging -------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        tracker = self.tracker
        if tracker is not None:
            values = numbers(metrics)
            if values:
                tracker.log_metrics(values, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        clean = plain(params)
        if isinstance(clean, dict) and clean:
            tracker.log_hyperparameters(clean)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """ModelCheckpoint saved: record its best (tags) and hand each new file to the run. A file that
        FlightlogCheckpointIO wrote is registered already (and uploaded per ``checkpointing.upload``); any
        other CheckpointIO's file is logged as an artifact of type ``checkpoint`` (MLflow and W&B get it)."""
        tracker = self.tracker
        if tracker is None:
            return
        best = getattr(checkpoint_callback, "best_model_path", "") or ""
        score = getattr(checkpoint_callback, "best_model_score", None)
        tags = {"lightning.best_model_path": best} if best else {}
        if score is not None:
            tags["lightning.best_model_score"] = str(float(score))
        if tags:
            tracker.set_tags(tags)
        if not self._upload:
            return
        ours = set().union(*(io.written for io in self._ios)) if self._ios else set()
        files = [*getattr(checkpoint_callback, "best_k_models", {}), getattr(checkpoint_callback, "last_model_path", "")]
        for path in dict.fromkeys(str(p) for p in files if p):
            if path in ours or not os.path.isfile(path):
                continue
            mtime = os.stat(path).st_mtime
            if self._uploaded.get(path) != mtime:
                tracker.log_artifact(path, type="checkpoint")
                self._uploaded[path] = mtime

    def save(self) -> None:
        """Nothing to do: every value is durable in the agent's WAL once logged (``tracker.flush()`` waits)."""

    def finalize(self, status: str) -> None:
        """End the run: wait for checkpoints still being written, then finish with ``completed``
        (Lightning's "success") or ``failed``. Using the logger again continues the same run."""
        if self._run.tracker is None:
            return
        for io in list(self._ios):
            io.settle()
        final, error = STATUS.get(status, "completed"), ""
        if final == "failed":  # Lightning calls this from its exception handler: the exception is current
            info = sys.exc_info()
            final, error = exit_status(*info) if info[0] is not None else ("failed", "Lightning: training failed")
        self._run.finish(final, error)


class _Into:
    """Receives the state a ModelCheckpointer load hands to ``load_state_dict``: the whole checkpoint dict."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        self.state = dict(state)


class _PathCheckpointer(ModelCheckpointer):
    """A ModelCheckpointer that writes where Lightning says (``epoch=1-step=8.ckpt``), not under its own
    names. (It overrides the one private method that picks a file name; a public ``path=`` on ``save`` would
    replace this.)"""

    _target: str | None = None

    def save_at(self, path: str, state: Mapping[str, Any], epoch: int, step: int, is_best: bool | None,
                metrics: Mapping[str, float]) -> PendingCheckpoint:
        with self._target_lock:
            self._target = path
            try:
                values: dict[str, Any] = dict(metrics)  # metrics only: none of them is save()'s own name=
                return self.save(state, epoch, step, is_best=is_best, **values)
            finally:
                self._target = None

    def _path_for(self, *args: Any, **kwargs: Any) -> str:
        if self._target is not None:
            return self._target
        return super()._path_for(*args, **kwargs)

    @property
    def _target_lock(self) -> threading.Lock:
        lock = self.__dict__.get("_save_at_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_save_at_lock", threading.Lock())
        return lock  # type: ignore[no-any-return]


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a file another CheckpointIO wrote


class CheckpointIOCore:
    """Lightning's ``CheckpointIO`` through flightlog's checkpoints (see ``flightlog.integrations.lightning``)."""

    _torch_io: Any = None  # the package's TorchCheckpointIO class, for files flightlog did not write

    def __init__(self, config: ConfigSource = None, *, tracker: ExperimentTracker | None = None,
                 restore_rng: bool = False) -> None:
        super().__init__()
        self._config = load_config(config) if config is not None else None
        self._tracker = tracker
        self._restore_rng = restore_rng
        self._ck: _PathCheckpointer | None = None
        self._ck_tracker: ExperimentTracker | None = None
        self._pending: dict[str, PendingCheckpoint] = {}
        self.written: set[str] = set()  # files this plugin wrote (the logger does not upload them again)

    # --- which checkpointer --------------------------------------------------------------------

    def _current_tracker(self) -> ExperimentTracker | None:
        if self._tracker is not None:
            return self._tracker
        logger = active_logger()
        if logger is None:
            return None
        logger._ios.add(self)
        return logger.tracker

    def _checkpointer(self, near: str) -> _PathCheckpointer:
        tracker = self._current_tracker()
        if self._ck is not None and self._ck_tracker is tracker and not self._ck._closed:
            return self._ck
        self.settle(close=True)
        ck: ModelCheckpointer
        if tracker is not None:
            ck = _PathCheckpointer.for_tracker(tracker)  # a classmethod: builds this subclass
        else:
            c = (self._config or load_config(None)).checkpointing
            ck = _PathCheckpointer(Path(near).parent, compression=c.compression,
                                   compression_level=c.compression_level, min_free_bytes=c.min_free_bytes)
        # Lightning's ModelCheckpoint keeps its top k and deletes the rest through remove_checkpoint;
        # flightlog's own retention must not delete a file Lightning still counts on.
        ck.max_checkpoints, ck.keep_every_n_steps, ck.monitor = 0, 0, None
        assert isinstance(ck, _PathCheckpointer)
        self._ck, self._ck_tracker = ck, tracker
        return ck

    # --- Lightning's API -----------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Stage the checkpoint into shared memory and return; the agent writes it durably (flightlog's
        format, no pickle) and registers it. Training is blocked only for the copy."""
        if storage_options is not None:
            raise TypeError(f"FlightlogCheckpointIO takes no storage_options, got {storage_options!r}")
        target = str(Path(path).expanduser().absolute())
        ck = self._checkpointer(target)
        is_best, metrics = _best_of(checkpoint, target)
        pending = ck.save_at(target, checkpoint, int(checkpoint.get("epoch", 0)),
                             int(checkpoint.get("global_step", 0)), is_best, metrics)
        self._pending[target] = pending
        self.written.add(target)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        target = str(Path(path).expanduser().absolute())
        self._wait(target)
        with open(target, "rb") as f:
            magic = f.read(4)
        if magic == _ZIP_MAGIC:  # written by TorchCheckpointIO (e.g. before switching to flightlog)
            return self._torch_io().load_checkpoint(path, map_location=map_location,  # type: ignore[no-any-return]
                                                    weights_only=weights_only)
        own = self._ck is not None and not self._ck._closed
        ck: ModelCheckpointer = self._ck if own and self._ck is not None else self._reader(target)
        into = _Into()
        try:
            ck.load(target, into, map_location="cpu" if map_location is None else map_location,
                    restore_rng=self._restore_rng, strict=False)
        finally:
            if ck is not self._ck:
                ck.close()
        return into.state

    def _reader(self, target: str) -> ModelCheckpointer:
        """A checkpointer to load with, starting no run: its registry (for the recorded checksum) is the
        run's store, or the standalone one beside the file."""
        tracker = self._tracker
        logger = active_logger()
        if tracker is None and logger is not None:
            tracker = logger._run.tracker
        beside = Path(target).parent / STANDALONE_NAME
        if tracker is not None:
            registry = tracker.paths.store
        elif beside.exists():
            registry = beside
        else:
            agent = (self._config or load_config(None)).agent
            registry = resolve_paths(agent.data_dir, agent.socket).store
        return ModelCheckpointer(Path(target).parent, max_checkpoints=0, monitor=None,
                                 registry=registry if registry.exists() else beside)

    def remove_checkpoint(self, path: Any) -> None:
        """ModelCheckpoint dropped a file from its top k: delete it and mark it deleted in the registry."""
        target = str(Path(path).expanduser().absolute())
        self._wait(target)
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        self.written.discard(target)
        registry = self._ck.registry_path if self._ck is not None else Path(target).parent / STANDALONE_NAME
        if registry.exists():
            with Registry(registry) as reg:
                reg.forget(target)

    def teardown(self) -> None:
        """End of fit: wait until every checkpoint is durable, release the staging buffers."""
        self.settle(close=True)

    # --- waiting -------------------------------------------------------------------------------

    def _wait(self, target: str) -> None:
        pending = self._pending.pop(target, None)
        if pending is not None:
            pending.wait()

    def settle(self, close: bool = False) -> None:
        """Wait for every checkpoint this plugin staged (``close``: and release its checkpointer)."""
        ck = self._ck
        if ck is None:
            return
        if close:
            self._ck = self._ck_tracker = None
            ck.close()
        else:
            ck.wait_all()
        self._pending.clear()


def _best_of(checkpoint: Mapping[str, Any], path: str) -> tuple[bool | None, dict[str, float]]:
    """Is ``path`` the best file of a ModelCheckpoint in the checkpoint's callback states, and the score it
    monitors (as the metric flightlog's registry records)? None when no callback monitors anything."""
    is_best: bool | None = None
    metrics: dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, Mapping) or "best_model_path" not in state or not state.get("monitor"):
            continue
        best = state.get("best_model_path") or ""
        if best:
            is_best = bool(is_best) or str(Path(best).absolute()) == path
        score = numbers({str(state["monitor"]): state.get("current_score")})
        metrics.update(score)
    return is_best, metrics
