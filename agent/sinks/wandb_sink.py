"""The W&B sink: each run's events into a wandb run (online, offline or disabled, from ``tracking.wandb_mode``).

The wandb run id is derived from the flightlog run id and runs are opened with ``resume="allow"``, so an
agent restart or a replay continues the same W&B run. The sink records the last WAL seq and step it handed
to wandb per run (in its registry, after every batch) and skips those on a re-send. The API key is left to
wandb's own environment / netrc handling: it is never read, logged or written by flightlog.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, NoReturn

from flightlog.agent.sinks._capture import wandb_capture
from flightlog.proto.errors import PermanentBackendError
from flightlog.proto.events import (
    Alert,
    Artifact,
    CheckpointSaved,
    Event,
    Histogram,
    HyperParams,
    Image,
    Metrics,
    RunEnd,
    RunStart,
    Tags,
    Text,
)
from flightlog.proto.osutil import make_dirs
from flightlog.proto.secrets import credential

from ._common import RunSinkBase, flatten, image_bytes, safe_name
from ._errors import ErrorTable, Rule

__all__ = ["WandBTracker", "wandb_run_id", "wandb_errors", "GIVEN_STEP_KEY"]

log = logging.getLogger("flightlog.agent.sinks")

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def wandb_run_id(run_id: str) -> str:
    """A stable W&B run id for a flightlog run id (W&B ids: at most 64 of ``[A-Za-z0-9_-]``)."""
    return ("fl-" + _ID_UNSAFE.sub("-", run_id))[:64]


def wandb_errors(wandb: Any) -> ErrorTable:
    """W&B's error table: bad credentials, misuse and values wandb rejects are permanent; its communication
    errors and the network's are retryable; anything else is unknown (the engine's capped retries)."""
    errors = getattr(wandb, "errors", None)

    def types(*names: str) -> tuple[type[BaseException], ...]:
        return tuple(t for n in names if isinstance(t := getattr(errors, n, None), type))

    # wandb-core's answer to a request (e.g. "run ID ... is in use" after an init that timed out): W&B's own
    # refusal of this attempt, retried like its communication errors
    try:
        from wandb.sdk.mailbox.mailbox_handle import ServerResponseError
        server: tuple[type[BaseException], ...] = (ServerResponseError,)
    except ImportError:  # another wandb layout: such errors stay unknown (the engine's capped retries)
        server = ()
    return ErrorTable("W&B", [
        Rule(types("AuthenticationError", "UsageError", "UnsupportedError", "WandbCoreNotAvailableError"),
             "permanent"),
        Rule((*types("CommError", "Error"), *server), "retryable"),
        Rule((ConnectionError, TimeoutError, OSError), "retryable", causes=True),
        Rule((ValueError, TypeError, OverflowError), "permanent"),
    ])


class _WbRun:
    def __init__(self, run: Any, state: dict[str, Any]) -> None:
        self.run = run
        self.state = state


#: The row field that keeps the step a run gave once its W&B step is a global one (the step restarted).
GIVEN_STEP_KEY = "step"


class _GlobalSteps:
    """W&B's step for each point: the given step, until a rank's step goes back (a loop whose step restarts
    every epoch); from then on that rank's steps are shifted past the last W&B step, so no row is lost and
    the W&B step keeps increasing. The shifts live in the sink's per-run state (a restart resumes them)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._offsets: dict[str, int] = state.setdefault("step_offsets", {})
        self._given: dict[str, int] = state.setdefault("given_steps", {})
        self.restarted: int | None = None  # a step a rank went back to in this batch

    def of(self, ev: Metrics | Histogram | Image, last: int) -> int:
        rank = str(ev.rank if isinstance(ev, Metrics) else 0)
        offset = self._offsets.get(rank, 0)
        if ev.step < self._given.get(rank, -1):
            offset = self._offsets[rank] = last + 1 - ev.step  # just past the last W&B step
            self.restarted = ev.step if self.restarted is None else self.restarted
        self._given[rank] = ev.step
        return ev.step + offset


class WandBTracker(RunSinkBase):
    """Sink ``wandb``: history rows by step, config, summary, tags and notes; finish with the exit code."""

    name = "wandb"
    batch_size = 1000

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self._runs: dict[str, _WbRun] = {}
        self._wandb: Any = None
        self._errors: ErrorTable | None = None

    def _lib(self) -> Any:
        if self._wandb is None:
            try:
                import wandb
            except ImportError as exc:
                raise PermanentBackendError(
                    "a run asks for W&B but wandb is not installed where the agent runs: "
                    "pip install 'flightlog[wandb]' and restart the agent"
                ) from exc
            self._wandb = wandb
        return self._wandb

    def _open_run(self, run_id: str, start: RunStart, group: str | None = None) -> _WbRun | None:
        wb = self._runs.get(run_id)
        if wb is not None:
            return wb
        tracking = self.tracking(start)
        mode = tracking.wandb_mode
        if mode == "disabled":
            return None
        wandb = self._lib()
        state = self.state_of(run_id)
        directory = tracking.wandb_dir or str(self.state_dir / "files")
        make_dirs(directory)  # only now: a run that does not use W&B leaves no trace of it
        settings: dict[str, Any] = dict(
            console="off", silent=True, x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
            save_code=False, disable_git=True, disable_job_creation=True, x_save_requirements=False,
        )
        if not os.environ.get("WANDB_INIT_TIMEOUT"):
            # wandb.init cannot be cancelled: keep an unreachable server from holding agent shutdown for 90 s.
            settings["init_timeout"] = 30
        if os.environ.get("WANDB_BASE_URL"):
            settings["base_url"] = os.environ["WANDB_BASE_URL"]  # read per run: the agent may outlive a change
        if tracking.wandb_api_key:  # a ${secret:NAME} reference, resolved here only, into wandb's settings
            settings["api_key"] = credential(tracking.wandb_api_key, "tracking.wandb_api_key",
                                             PermanentBackendError)
        config = {k: v for k, v in (start.config or {}).items()}
        captured, source = wandb_capture(start)  # git, command line: what W&B records of its own process
        config["flightlog"] = captured
        settings.update(source)
        try:
            run = wandb.init(
                project=tracking.wandb_project, entity=tracking.wandb_entity or None,
                name=start.name, notes=start.description or None, tags=[str(t)[:64] for t in start.tags] or None,
                config=config, mode=mode, dir=directory, id=wandb_run_id(run_id), resume="allow",
                reinit="create_new", settings=wandb.Settings(**settings), **({"group": group} if group else {}),
            )
        except Exception as exc:
            self._raise(exc, f"starting W&B run {start.name!r} ({mode})")
        state.setdefault("seq", -1)
        state.setdefault("step", -1)
        wb = _WbRun(run, state)
        self._runs[run_id] = wb
        return wb

    def _classify(self, exc: Exception, what: str) -> BaseException:
        """What to raise for a wandb error (by ``wandb_errors``); an unknown one as it is."""
        if self._errors is None:
            self._errors = wandb_errors(self._lib())
        return self._errors.translate(exc, what)

    def _raise(self, exc: Exception, what: str) -> NoReturn:
        err = self._classify(exc, what)
        if err is exc:
            raise exc
        raise err from exc

    def _forget_run(self, run_id: str) -> None:
        self._forget(run_id)

    def _write_run(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        state = self.state_of(run_id)
        done = int(state.get("seq", -1))
        events = [(s, ev) for s, ev in events if s > done]
        if not events or state.get("ended"):
            return
        wb = self._open_run(run_id, start, _group_of(events))
        if wb is None:  # wandb_mode: disabled
            return
        run, st = wb.run, wb.state
        step = int(st.get("step", -1))
        row: dict[str, Any] = {}
        row_step = step
        row_ts = 0.0  # the events' own time: W&B would stamp the row with the moment it is sent
        skipped = 0
        steps = _GlobalSteps(st)
        end: RunEnd | None = None
        try:
            for _seq, ev in events:
                if isinstance(ev, (Metrics, Histogram, Image)):
                    at = steps.of(ev, step)
                    if at != row_step and row:
                        run.log({**row, "_timestamp": row_ts}, step=row_step)
                        row = {}
                    if at < step:
                        skipped += 1  # W&B steps only go forward; wandb would drop it with a warning
                        continue
                    row_ts = max(row_ts, ev.timestamp) if row else ev.timestamp
                    if isinstance(ev, Metrics):
                        row.update(ev.values)
                    else:
                        media = _media(ev)
                        if media is not None:
                            row[ev.key] = media
                    if at != ev.step:
                        row[GIVEN_STEP_KEY] = ev.step
                    row_step = step = at
                elif isinstance(ev, HyperParams):
                    run.config.update(flatten(ev.params), allow_val_change=True)
                elif isinstance(ev, Tags):
                    run.tags = tuple(dict.fromkeys([*run.tags, *(f"{k}:{v}"[:64] for k, v in ev.tags.items())]))
                elif isinstance(ev, Text):
                    run.summary[f"text/{ev.key}"] = ev.text
                elif isinstance(ev, CheckpointSaved):
                    run.summary["checkpoint/last_path"] = ev.path
                    for k, v in ev.metrics.items():
                        run.summary[f"checkpoint/{k}"] = v
                elif isinstance(ev, Alert):
                    run.summary[f"alerts/{ev.level}"] = ev.message
                elif isinstance(ev, Artifact):
                    self._log_artifact(run, ev)
                elif isinstance(ev, RunEnd):
                    end = ev
            if row:
                run.log({**row, "_timestamp": row_ts}, step=row_step)
        except Exception as exc:
            # The run object is in an unknown state: reopen it (resume) on the retry.
            self._forget(run_id)
            self._raise(exc, f"logging to W&B run {start.name!r}")
        _warn_steps(run_id, st, steps.restarted, skipped)
        st["seq"] = events[-1][0]
        st["step"] = step
        if end is not None:
            try:
                if end.dropped:
                    run.summary["flightlog/dropped_events"] = end.dropped
                # Any end but "completed" is a non-zero exit (W&B shows the run failed); the summary keeps
                # flightlog's own word: W&B's "crashed" state means lost heartbeats, not a dead trainer.
                run.summary["flightlog/status"] = end.status
                run.finish(exit_code=0 if end.status == "completed" else 1)
            except Exception as exc:
                self._forget(run_id)
                self._raise(exc, f"finishing W&B run {start.name!r}")
            st["ended"] = True
            self._runs.pop(run_id, None)
        self.save_state(run_id, st)

    def _log_artifact(self, run: Any, ev: Artifact) -> None:
        """A file as a W&B artifact; checkpoints become versions of one ``model`` artifact per run."""
        if not os.path.exists(ev.path):
            log.warning("W&B: artifact %s (%s) no longer exists; not uploaded", ev.name, ev.path)
            return
        wandb = self._lib()
        if ev.kind == "checkpoint":
            name, kind = f"checkpoints-{run.id}", "model"
        else:
            name, kind = ev.name, ev.kind or "file"
        art = wandb.Artifact(safe_name(name, 128), type=safe_name(kind, 128),
                             metadata={"checksum": ev.checksum, "size": ev.size, "source": ev.path})
        if os.path.isdir(ev.path):
            art.add_dir(ev.path)
        else:
            art.add_file(ev.path, name=ev.name)
        run.log_artifact(art, aliases=["latest"])

    def _forget(self, run_id: str) -> None:
        wb = self._runs.pop(run_id, None)
        if wb is not None:
            try:
                wb.run.finish(exit_code=1)
            except Exception:
                log.debug("W&B: finishing a broken run failed", exc_info=True)

    def close(self) -> None:
        # The agent stops but the training may go on: the runs are finished here and resumed
        # (resume="allow", same id) by the next agent.
        for run_id in list(self._runs):
            wb = self._runs.pop(run_id)
            try:
                wb.run.finish(exit_code=0)
            except Exception:
                log.warning("W&B: closing run %s failed", run_id, exc_info=True)
        if self._wandb is not None:
            try:
                self._wandb.teardown()
            except Exception:
                log.warning("W&B: teardown failed", exc_info=True)


def _warn_steps(run_id: str, st: dict[str, Any], restarted: int | None, skipped: int) -> None:
    """Once per run: its W&B step became a global one, or rows (another rank's, behind) were left out."""
    if restarted is not None and not st.get("warned_restart"):
        st["warned_restart"] = True
        log.warning("W&B: run %s's step went back to %d (a step that restarts every epoch?); W&B needs steps"
                    " that increase, so it gets a global step that keeps increasing and the step you gave as"
                    " the field %r", run_id, restarted, GIVEN_STEP_KEY)
    if skipped and not st.get("warned_backwards"):
        st["warned_backwards"] = True
        log.warning("W&B: run %s logged %d rows with a step below an earlier one; W&B keeps steps increasing,"
                    " so they are only in the other backends", run_id, skipped)


#: A run's parent (a study's trial -> the study): W&B groups the children under the parent's run id.
PARENT_TAG = "flightlog.parent_run_id"


def _group_of(events: list[tuple[int, Event]]) -> str | None:
    """The W&B group of a run about to be opened: its parent's run id, from a Tags event the SDK sends right
    after the run's start (W&B takes a group only in ``wandb.init``)."""
    for _seq, ev in events:
        if isinstance(ev, Tags) and ev.tags.get(PARENT_TAG):
            return str(ev.tags[PARENT_TAG])[:128]
    return None


def _media(ev: Histogram | Image) -> Any:
    """A wandb Histogram or Image for the event (None when an image file is gone)."""
    import wandb

    if isinstance(ev, Histogram):
        limits = list(ev.bucket_limits)
        if not limits:
            return None
        # TensorBoard buckets are right edges; W&B wants every edge.
        first = limits[0] - (limits[1] - limits[0]) if len(limits) > 1 else ev.min
        edges = (list(ev.bucket_counts), [first, *limits])  # wandb takes lists as well as arrays
        return wandb.Histogram(np_histogram=edges)  # type: ignore[arg-type]
    png = image_bytes(ev)
    if png is None:
        return None
    import io

    from PIL import Image as PILImage

    return wandb.Image(PILImage.open(io.BytesIO(png)), caption=ev.caption or None)
