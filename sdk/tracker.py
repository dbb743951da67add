"""ExperimentTracker: a thin facade over the run's parts — its metadata (``flightlog.metadata``), the
transport into the agent (``flightlog.transport``, ``flightlog.link``), the log_metrics hot path
(``flightlog.metrics``), artifacts, progress, the visualisation helpers and the checkpointer."""
from __future__ import annotations

import atexit
import logging
import os
import platform
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flightlog import artifacts, capture, health
from flightlog.distributed import job_identity, node_fields
from flightlog.hparams import RunParams
from flightlog.link import AgentLink
from flightlog.metadata import ExperimentMetadata, absolute_paths, new_metadata, run_metadata, sinks_of
from flightlog.metrics import MetricsPath
from flightlog.progress import RunProgress
from flightlog.proto.config import Config, config_to_dict, load_config
from flightlog.proto.errors import AgentUnavailable, FlightlogError, TrackerFinished
from flightlog.proto.events import Event, HyperParams, Image, Metrics, RunEnd, RunStart, Tags, Text, Unregister
from flightlog.proto.paths import resolve_paths
from flightlog.ring import RingProducer, ring_supported
from flightlog.transport import Transport, open_transport, rings_reach_agent
from flightlog.validate import KeyRules, check_experiment_name, check_run_id, check_step

__all__ = ["ExperimentTracker", "ExperimentMetadata", "experiment_tracking", "exit_status"]

log = logging.getLogger("flightlog")

_STATUSES = ("running", "completed", "failed", "killed")


class ExperimentTracker:
    """Logs one run. ``log_metrics`` encodes an event and copies it into a shared-memory ring.

    Every method may be called from any thread. The thread that created the tracker writes into the run's
    ring without a lock; other threads (callbacks, data-loader hooks) go through a side channel of their own
    behind a lock, so the ring keeps its single producer.
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
        check_experiment_name(name)
        job = job_identity()
        # One job, one run: the launcher's job identity names the run every rank joins (run_id= and
        # FLIGHTLOG_RUN_ID override it); a process no launcher started is its own run, a world of one.
        chosen = run_id or job.run_id
        self.run_id = check_run_id(chosen) if chosen else uuid.uuid4().hex[:16]
        self.world_size = job.world_size if chosen else 1
        self.config: Config = load_config(config)
        cfg = self.config
        self.rank = job.rank if rank is None else rank
        self.local_rank = job.local_rank
        #: Another rank's tracker of a distributed run: it logs metrics, rank 0 the run's description.
        self._joined = self.world_size > 1 and self.rank != 0
        self.metadata, git_diff = new_metadata(self.run_id, name, cfg, self.rank, description, tags)
        self.paths = resolve_paths(cfg.agent.data_dir, cfg.agent.socket)
        self._finished = False
        self._ckpt: Any = None
        d = config_to_dict(cfg)
        self._link = AgentLink(self.paths, {"agent": d["agent"], "wal": d["wal"],  # a sidecar shares with access.group
                                            "access": {"group": cfg.access.group}},
                               autostart=cfg.agent.autostart, timeout=cfg.agent.connect_timeout_seconds)
        if not ring_supported():
            log.info("flightlog: no shared-memory ring on this CPU (%s); events go to the agent over its "
                     "socket, in batches", platform.machine())
        self._transport: Transport = open_transport(self.paths, cfg.agent, self.run_id, self.rank, self._link,
                                                    ring_supported() and rings_reach_agent(self.paths))
        self.producer_id = self._transport.producer_id
        self._rules = KeyRules(mlflow=cfg.tracking.use_mlflow)
        self._params = RunParams(cfg, self._rules, self.metadata.config_hash)
        experiment = self._params.clean(cfg.experiment)  # the user's config sections: hyper-parameters
        self._progress = RunProgress(self._emit_progress)
        self._metrics = MetricsPath(self.run_id, self._transport, self._rules, self._progress.tick,
                                    self.rank if self.world_size > 1 else 0)
        self.__dict__["log_metrics"] = self._metrics.log_metrics  # the closure: no bound-method hop per call
        self._connect()
        start = RunStart(
            run_id=self.run_id, name=name, timestamp=self.metadata.created_at,
            description=self.metadata.description, tags=self.metadata.tags,
            config=absolute_paths(self.metadata.config), config_hash=self.metadata.config_hash,
            sinks=sinks_of(cfg), pid=os.getpid(), rank=self.rank, host=self.metadata.host,
            metadata=run_metadata(self.metadata), world_size=self.world_size, **node_fields(),
        )
        self._emit(start)
        self._transport.mark_start(start)
        if experiment and not self._joined:
            self._emit(HyperParams(self.run_id, experiment, start.timestamp))
        if git_diff and self.rank == 0:  # rank 0 owns the run's capture
            saved = artifacts.save_git_diff(self.run_id, self.run_dir, git_diff)
            if saved is not None:
                self.metadata.git["diff_artifact"] = str(saved[0])
                self._emit(saved[1])
        capture._listen_for_seed(self)
        self._summary: dict[str, Any] | None = None
        # Rank 0 hears about the run's delivery trouble (flightlog.health): a thread in a long poll.
        self._watcher = health.HealthWatcher(self.paths, self.run_id, cfg.notify.after_seconds).start() \
            if self.rank == 0 else None
        if total_steps is not None:
            self.progress(total_steps)
        atexit.register(self._atexit)

    def _connect(self) -> None:
        for reg in self._transport.registrations():
            self._link.register(reg)
        if self._link.connect(warn=self._transport.ring is not None):  # says "no agent ... yet" once
            return
        if self._transport.ring is None:
            raise AgentUnavailable(
                f"no flightlog agent on {self.paths.socket} and this CPU has no shared-memory ring; "
                "start one with `flightlog agent`"
            )

    @property
    def _producer(self) -> RingProducer | None:
        """The owner thread's ring (None on the socket transport)."""
        return self._transport.ring

    @property
    def _client(self) -> Any:
        return self._link.client

    @property
    def _step(self) -> int:
        return self._metrics.step

    # --- logging ---------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numbers at a step (default: the previous step + 1). NaN and ±inf are logged as they are.

        A step lower than the previous one is recorded as given (one warning per run). (Each tracker replaces
        this method by its ``flightlog.metrics`` closure; this body only serves calls through the class.)
        """
        self._metrics.log_metrics(metrics, step)

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        """Log hyper-parameters (values: numbers, strings, bools, None, or nested lists/dicts). The run's
        ``config_hash`` then covers them too."""
        self._alive("log_hyperparameters")
        clean = self._params.clean(params)
        self.metadata.config_hash = digest = self._params.record(params)
        if self._ckpt is not None:
            self._ckpt.config_hash = digest  # checkpoints saved from now on carry the run's new hash
        if self._joined:
            return  # rank 0 owns the run's hyper-parameters (a backend keeps one value per key)
        self._emit(HyperParams(self.run_id, clean, time.time(), config_hash=digest))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._alive("set_tags")
        clean = capture.redact({str(k): str(v) for k, v in tags.items()})
        self._rules.check(clean, "tag key")
        if not self._joined:  # rank 0 owns the run's tags
            self._emit(Tags(self.run_id, clean, time.time()))

    def log_image(self, key: str, image: Any, step: int | None = None, *, caption: str = "") -> None:
        """Log an image (numpy array or tensor H×W, H×W×C or C×H×W; or a PIL image) to every backend that
        has images: TensorBoard images, W&B media, MLflow artifacts under ``images/``, the local store."""
        from flightlog.media import image_png

        self._log_png("log_image", key, image_png, image, step, caption)

    def log_figure(self, key: str, figure: Any, step: int | None = None, *, caption: str = "") -> None:
        """Log a matplotlib figure as an image (see ``log_image``)."""
        from flightlog.media import figure_png

        self._log_png("log_figure", key, figure_png, figure, step, caption)

    def _log_png(self, what: str, key: str, encode: Any, obj: Any, step: int | None, caption: str) -> None:
        self._alive(what)
        self._rules.check([key], "image key")
        self._emit_checked([Image(self.run_id, key, self._at(step), time.time(), "", encode(obj), str(caption))])

    def log_text(self, key: str, text: str, step: int | None = None) -> None:
        self._alive("log_text")
        if not isinstance(key, str) or not key:
            raise (ValueError if key == "" else TypeError)(f"log_text key must be a non-empty str, got {key!r:.80}")
        self._emit(Text(self.run_id, key, str(text), self._metrics.step if step is None else check_step(step),
                        time.time()))

    def _alive(self, what: str) -> None:
        """Refuse a call after finish(): the ring, its memory and the agent connection are released."""
        if self._finished:
            raise self._finished_error(what)

    def _finished_error(self, what: str = "log_metrics") -> TrackerFinished:
        return TrackerFinished(
            f"tracker {self.metadata.name!r} ({self.run_id}) is finished: {what}() after finish() is refused; "
            f"start a new ExperimentTracker (run_id={self.run_id!r} continues this run)"
        )

    def _emit(self, event: Event) -> None:
        self._transport.emit(event)

    def _emit_progress(self, step: int, metrics: dict[str, float]) -> None:
        self._emit(Metrics(self.run_id, step, time.time(), metrics, self._metrics.rank))

    def _at(self, step: int | None) -> int:
        return max(self._metrics.step, 0) if step is None else check_step(int(step))

    # --- checkpoints (flightlog.checkpoint, imported on first use: it needs torch) ---------------

    def _checkpointer(self, what: str) -> Any:
        self._alive(what)
        if self._ckpt is None:  # torch.distributed with a world > 1: DCP, one directory per checkpoint
            from flightlog.checkpoint.distributed import checkpointer_for

            self._ckpt = checkpointer_for(self)
        return self._ckpt

    def save_checkpoint(self, model: Any = None, epoch: int = 0, step: int = 0, optimizer: Any = None,
                        **kwargs: Any) -> Any:
        """Stage the state into shared memory and return the final path at once (a str with ``.wait()``).

        Keyword arguments: ``scheduler=``, ``scaler=``, ``is_best=``, and any metrics (``val_loss=...``).
        """
        return self._checkpointer("save_checkpoint").save(model, epoch, step, optimizer, **kwargs)

    def get_best_checkpoint(self, run_id: str | None = None) -> str | None:
        """This run's best checkpoint (or ``run_id``'s, in the same checkpoint_dir), or None."""
        return self._checkpointer("get_best_checkpoint").best(run_id)  # type: ignore[no-any-return]

    def load_checkpoint(self, path: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> tuple[int, int]:
        """Restore state from ``path`` ("best" or "latest" of this run, or of ``run_id=``; or a file);
        returns (epoch, step)."""
        return self._checkpointer("load_checkpoint").load(path, model, optimizer, **kwargs)  # type: ignore[no-any-return]

    def should_checkpoint(self, step: int) -> bool:
        """True every ``checkpointing.save_frequency`` steps (never when it is 0)."""
        self._alive("should_checkpoint")
        freq = self.config.checkpointing.save_frequency
        return freq > 0 and step > 0 and step % freq == 0

    # --- durability and lifecycle ----------------------------------------------------------------

    def flush(self, timeout: float = 60.0) -> None:
        """Return once everything logged so far (from every thread) is in the agent's WAL and fsynced, and
        every checkpoint saved so far is durable."""
        self._alive("flush")
        self._flush(timeout)

    def _flush(self, timeout: float) -> None:
        self._metrics.drain()  # staged CUDA values first: flush covers everything logged so far
        if self._ckpt is not None:
            self._ckpt.wait_all(timeout)
        self._transport.flush(timeout)

    def finish(self, status: str = "completed", error: str = "") -> None:
        """End the run: record its status, make every event durable, release the ring."""
        if self._finished:
            return
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        self._finished = True
        self._metrics.drain()  # before the RunEnd
        self._metrics.retire(self._finished_error)  # from here log_metrics raises, on every thread
        md = self.metadata
        md.status, md.error, md.ended_at = status, error, time.time()
        dropped = self._transport.dropped
        if dropped:
            log.warning("flightlog: %d events were dropped because the ring was full (agent.on_full=drop)", dropped)
        self._progress.close()
        if not self._link.connected:
            self._connect_quietly()  # an agent may have come up since (or autostart starts one now)
        self._transport.fence_before_end()
        self._emit(RunEnd(self.run_id, status, md.ended_at, error, dropped, self.rank))
        try:
            if self._link.connected:
                self._flush(60.0)
                if self._watcher is not None:
                    self._summary = health.finish_summary(self._link, self.run_id, md.name,
                                                          after_seconds=self.config.notify.after_seconds,
                                                          wait=self.config.notify.finish_wait_seconds)
                for producer_id in self._link.producer_ids:
                    self._link.request(Unregister(producer_id), reconnect=False)
        except FlightlogError as exc:
            log.warning("flightlog: could not confirm the end of run %s with the agent: %s", self.run_id, exc)
        finally:
            if self._watcher is not None:
                self._watcher.stop()
            if self._ckpt is not None:
                self._ckpt.close()  # waits for checkpoint writes still running, frees the staging buffers
            self._link.close()
            self._transport.close()
            atexit.unregister(self._atexit)

    def health(self) -> dict[str, Any]:
        """How each sink serves this run: per sink ``status`` (delivered, pending, retrying, parked), the reason,
        the events kept and the replay command — what finish() prints (after finish(): its summary)."""
        if self._finished:
            return self._summary or {"run_id": self.run_id, "connected": False, "sinks": {}}
        return health.ask_health(self._link, self.run_id, after_seconds=self.config.notify.after_seconds)

    def _connect_quietly(self) -> None:
        try:
            self._link.connect()
        except FlightlogError as exc:
            log.warning("flightlog: could not reach the agent at the end of run %s: %s", self.run_id, exc)

    def _atexit(self) -> None:
        if not self._finished:
            self.finish("completed")

    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(*exit_status(exc_type, exc, tb))

    # --- reproducibility, progress, artifacts --------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """This run's directory in the agent's data directory (artifacts, plots)."""
        return self.paths.data_dir / "runs" / self.run_id

    def _record_seed(self, info: dict[str, Any]) -> None:
        """Called by flightlog.seed_everything while this run is alive."""
        if self._finished:
            return
        self.metadata.seed = info
        if self._joined:
            return  # each rank's seed differs; the run keeps rank 0's
        self._emit(HyperParams(self.run_id, {"seed": info["seed"], "deterministic": info["deterministic"]},
                               time.time()))

    def progress(self, total_steps: int) -> None:
        """Track progress towards ``total_steps``: a bar on a terminal (rank 0 only), and the metrics
        ``progress/eta_seconds`` and ``progress/steps_per_second``, from the steps log_metrics sees."""
        self._alive("progress")
        self._progress.start(total_steps, bar=None if self.rank == 0 else False)
        self.metadata.total_steps = total_steps
        self._metrics.progress_next = 0

    def log_artifact(self, path: str | os.PathLike[str], name: str | None = None, type: str | None = None) -> Path:
        """Copy a file or directory into the run's directory, with a sha256, and hand it to the sinks.

        Returns the copy's path. A second artifact of the same name replaces the first.
        """
        self._alive("log_artifact")
        dest, event = artifacts.copy_artifact(self.run_id, self.run_dir, path, name, type)
        self._emit(event)
        return dest

    # --- visualisation (flightlog.viz: imports torch on first use) --------------------------------------

    def log_gradient_flow(self, model: Any, step: int | None = None, *, plot: bool = True) -> dict[str, float]:
        """Per-layer gradient L2 norms as ``grad_norm/<param>`` metrics, and (``plot=True``) a gradient-flow
        bar chart as the image ``gradient_flow``. Call after ``backward()``; does not move the step."""
        self._alive("log_gradient_flow")
        from flightlog import viz  # light, but not needed by most runs

        norms, events = viz.gradient_flow_events(self.run_id, model, self._at(step), plot)
        self._emit_checked(events)
        return norms

    def log_histograms(self, model: Any, step: int | None = None, *, bins: int = 64,
                       gradients: bool = True) -> int:
        """``weights/<param>`` and ``gradients/<param>`` histograms; returns how many were logged."""
        self._alive("log_histograms")
        from flightlog import viz

        events = viz.histogram_events(self.run_id, viz.parameter_histograms(model, bins=bins, gradients=gradients),
                                      self._at(step))
        self._emit_checked(events)
        return len(events)

    def log_data_distribution(self, batch: Any, step: int | None = None, *, bins: int = 64) -> int:
        """``data/<name>`` histograms (and ``data/<name>/mean``, ``/std`` metrics) of a batch's tensors."""
        self._alive("log_data_distribution")
        from flightlog import viz

        n, events = viz.data_distribution_events(self.run_id, batch, self._at(step), bins)
        self._emit_checked(events)
        return n

    def log_model_summary(self, model: Any) -> str:
        """The model's layers and parameter counts as the text ``model/summary``; counts as parameters."""
        self._alive("log_model_summary")
        from flightlog import viz

        text, events = viz.model_summary_events(self.run_id, model, self._at(None))
        self._emit_checked(events)
        return text

    def memory_stats(self, *, log: bool = True) -> dict[str, float]:
        """CUDA memory of this process per device (allocated, max allocated, reserved, max reserved bytes),
        logged as ``memory/cuda:<i>/...`` metrics at the current step. {} when torch is not loaded or has
        no GPU (torch is never imported here)."""
        self._alive("memory_stats")
        from flightlog import viz

        out = viz.cuda_memory_stats()
        if log and out:
            self._emit_checked([Metrics(self.run_id, self._at(None), time.time(), out, self._metrics.rank)])
        return out

    def _emit_checked(self, events: list[Any]) -> None:
        """Events built here from model or batch names: their keys checked against the run's backends."""
        for ev in events:
            if type(ev) is Metrics:
                self._rules.metrics(ev.values)
        for ev in events:
            self._emit(ev)


def exit_status(exc_type: Any, exc: Any, tb: Any) -> tuple[str, str]:
    """(status, error) of a block that ended with this exception (``__exit__``'s arguments; all None: it
    did not raise): ``completed``, ``killed`` for KeyboardInterrupt, else ``failed`` with the traceback."""
    if exc_type is None:
        return "completed", ""
    if issubclass(exc_type, KeyboardInterrupt):
        return "killed", "KeyboardInterrupt"
    return "failed", "".join(traceback.format_exception(exc_type, exc, tb))


@contextmanager
def experiment_tracking(
    name: str, config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None, **kwargs: Any
) -> Iterator[ExperimentTracker]:
    """``with experiment_tracking(name, config) as tracker:`` — completed on exit, failed (+traceback) on error."""
    tracker = ExperimentTracker(name, config, **kwargs)
    with tracker:
        yield tracker
