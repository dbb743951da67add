"""The MLflow sink: each run's events into an MLflow run (a tracking server URL or a local store such as
``sqlite:///``), through ``MlflowClient.log_batch`` within MLflow's request limits.

Exactly once: metrics keep their original timestamp (ms) and step, so a batch re-sent after a crash between
ack and cursor commit is deduplicated by MLflow's metric key; params re-logged with the same value and tags
are idempotent; the flightlog run id <-> MLflow run id mapping is kept in the sink's registry and as the tag
``flightlog.run_id``, so a replay after losing the registry reuses the same MLflow run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flightlog.proto.errors import PermanentBackendError, RetryableBackendError
from flightlog.proto.events import (
    Alert,
    Artifact,
    CheckpointSaved,
    Event,
    HyperParams,
    Image,
    Metrics,
    RunEnd,
    RunStart,
    SystemStats,
    Tags,
    Text,
)

from ._common import RunSinkBase, flatten, image_bytes, safe_name

__all__ = ["MLflowTracker", "classify_mlflow_error", "chunk_batch", "MAX_METRICS", "MAX_PARAMS", "MAX_TAGS",
           "MAX_PARAM_LENGTH"]

log = logging.getLogger("flightlog.agent.sinks")

#: MLflow's log_batch limits: per request, and 1000 entities in all.
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
RUN_ID_TAG = "flightlog.run_id"
_STATUS = {"completed": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_RETRYABLE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "DEADLINE_EXCEEDED", "ABORTED"}
_KEY_IN_MESSAGE = re.compile(r"'key': '([^']+)'|[Pp]aram(?:eter)? (?:name|key)?\s*'([^']+)'")


def chunk_batch(metrics: list[Any], params: list[Any], tags: list[Any]) -> Iterator[tuple[list[Any], list[Any], list[Any]]]:
    """(metrics, params, tags) requests within MLflow's limits; params and tags go first."""
    p, t = 0, 0
    while p < len(params) or t < len(tags):
        yield [], params[p:p + MAX_PARAMS], tags[t:t + MAX_TAGS]
        p += MAX_PARAMS
        t += MAX_TAGS
    for i in range(0, len(metrics), MAX_METRICS):
        yield metrics[i:i + MAX_METRICS], [], []


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def classify_mlflow_error(exc: Exception, what: str) -> Exception:
    """An MLflow (or transport) error as a flightlog BackendError: connection trouble, 5xx and 429 are
    retryable; other 4xx are permanent, naming the offending key when the message names one."""
    import requests

    for e in _chain(exc):
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return RetryableBackendError(f"MLflow unreachable while {what}: {_short(exc)}")
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.error_code
        try:
            status = int(exc.get_http_status_code())
        except Exception:
            status = 500
        text = _short(exc)
        # A transport failure after MLflow's own retries (status codes lost) arrives as INTERNAL_ERROR too.
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return RetryableBackendError(f"MLflow error while {what}: {text}")
        m = _KEY_IN_MESSAGE.search(str(exc))
        key = next((g for g in m.groups() if g), None) if m else None
        where = f" (key {key!r})" if key else ""
        return PermanentBackendError(f"MLflow refused {what}{where}: {code}: {text}")
    if isinstance(exc, OSError):
        return RetryableBackendError(f"MLflow store error while {what}: {exc}")
    return exc


def _short(exc: BaseException, limit: int = 500) -> str:
    s = str(exc)
    return s if len(s) <= limit else s[:limit] + "…"


def _param_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


class _MlRun:
    def __init__(self, client: Any, mlflow_run_id: str, uri: str) -> None:
        self.client = client
        self.id = mlflow_run_id
        self.uri = uri


class MLflowTracker(RunSinkBase):
    """Sink ``mlflow``: one MLflow run per flightlog run; experiment ``tracking.mlflow_experiment_name``
    or the run's name; tracking URI ``tracking.mlflow_tracking_uri``."""

    name = "mlflow"
    batch_size = 1000

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self._clients: dict[str, Any] = {}
        self._runs: dict[str, _MlRun] = {}
        self._warned: set[tuple[str, str]] = set()

    def open(self) -> None:
        super().open()
        # The runner owns retries (with backoff, breaker and status); MLflow's own retry loop would hold a
        # worker thread for minutes during an outage and hide the error from `flightlog status`.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        return None

    def _client(self, uri: str) -> Any:
        c = self._clients.get(uri)
        if c is None:
            try:
                from mlflow import MlflowClient
            except ImportError as exc:
                raise PermanentBackendError(
                    "a run asks for MLflow but mlflow is not installed where the agent runs: "
                    "pip install 'flightlog[mlflow]' and restart the agent"
                ) from exc
            try:
                c = MlflowClient(tracking_uri=uri)
            except Exception as exc:
                raise classify_mlflow_error(exc, f"connecting to {uri}") from exc
            self._clients[uri] = c
        return c

    # --- runs ---

    def _run(self, run_id: str, start: RunStart) -> _MlRun:
        run = self._runs.get(run_id)
        if run is not None:
            return run
        tracking = self.tracking(start)
        uri = str(tracking.get("mlflow_tracking_uri") or "sqlite:///mlflow.db")
        client = self._client(uri)
        state = self.state_of(run_id)
        ml_id = state.get("mlflow_run_id") if state.get("uri") == uri else None
        try:
            if ml_id is None:
                ml_id = self._find_or_create(client, start, tracking)
                state.update(uri=uri, mlflow_run_id=ml_id)
                self.save_state(run_id, state)
        except PermanentBackendError:
            raise
        except Exception as exc:
            raise classify_mlflow_error(exc, f"creating the MLflow run for {start.name!r}") from exc
        run = _MlRun(client, ml_id, uri)
        self._runs[run_id] = run
        return run

    def _find_or_create(self, client: Any, start: RunStart, tracking: dict[str, Any]) -> str:
        exp_name = tracking.get("mlflow_experiment_name") or start.name
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else None
        if exp_id is None:
            try:
                exp_id = client.create_experiment(exp_name, artifact_location=_local_artifact_root(tracking))
            except Exception:
                exp = client.get_experiment_by_name(exp_name)  # created concurrently by someone else
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        found = client.search_runs([exp_id], f"tags.`{RUN_ID_TAG}` = '{start.run_id}'", max_results=1)
        if found:
            return found[0].info.run_id  # type: ignore[no-any-return]
        tags = {RUN_ID_TAG: start.run_id, "flightlog.host": start.host, "flightlog.rank": str(start.rank),
                "flightlog.pid": str(start.pid)}
        if start.config_hash:
            tags["flightlog.config_hash"] = start.config_hash
        if start.description:
            tags["mlflow.note.content"] = start.description[:MAX_TAG_LENGTH]
        for t in start.tags:
            tags[str(t)] = ""
        run = client.create_run(exp_id, start_time=int(start.timestamp * 1000), tags=tags, run_name=start.name)
        return run.info.run_id  # type: ignore[no-any-return]

    # --- writing ---

    def _write_run(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run = self._run(run_id, start)
        metrics: list[Any] = []
        params: dict[str, Any] = {}
        param_groups: list[dict[str, Any]] = []
        tags: dict[str, str] = {}
        end: tuple[int, RunEnd] | None = None
        texts: list[Text] = []
        artifacts: list[Artifact] = []
        images: list[Image] = []  # plots: artifacts under images/ (MLflow has no histogram type: skipped)
        add = metrics.append
        for seq, ev in events:
            t = type(ev)
            if t is Metrics:
                ts, step = int(ev.timestamp * 1000), ev.step
                for k, v in ev.values.items():
                    add(Metric(k, float(v), ts, step))
            elif t is SystemStats:
                ts, step = int(ev.timestamp * 1000), ev.step
                for k, v in ev.values.items():  # the monitor's keys already read system/...
                    add(Metric(k, float(v), ts, step))
            elif t is HyperParams:
                for k, v in flatten(ev.params).items():
                    value = self._param(run_id, k, _param_value(v))
                    if params.get(k, value) != value:
                        # A changed value: send what came before so MLflow judges them in order (and refuses).
                        param_groups.append(params)
                        params = {}
                    params[k] = value
            elif t is Tags:
                for k, v in ev.tags.items():
                    tags[k] = str(v)[:MAX_TAG_LENGTH]
            elif t is Text:
                texts.append(ev)
            elif t is CheckpointSaved:
                if ev.metrics:
                    ts = int(ev.timestamp * 1000)
                    for k, v in ev.metrics.items():
                        add(Metric(f"checkpoint/{k}", float(v), ts, ev.step))
                tags["flightlog.last_checkpoint"] = ev.path[:MAX_TAG_LENGTH]
            elif t is Artifact:
                artifacts.append(ev)
            elif t is Image:
                images.append(ev)
            elif t is Alert:
                tags[f"flightlog.alert.{ev.level}"] = ev.message[:MAX_TAG_LENGTH]
            elif t is RunEnd:
                end = (seq, ev)
        for group in param_groups:
            self._send(run, [Param(k, v) for k, v in group.items()], [], [])
        self._send(run, [Param(k, v) for k, v in params.items()], [RunTag(k, v) for k, v in tags.items()],
                   metrics)
        for tx in texts:
            self._call(run, "logging text " + repr(tx.key), run.client.log_text, run.id, tx.text,
                       f"text/{tx.key}/step_{tx.step}.txt")
        for ar in artifacts:
            if not os.path.exists(ar.path):
                log.warning("MLflow: artifact %s (%s) no longer exists; not uploaded", ar.name, ar.path)
                continue
            self._call(run, f"uploading artifact {ar.path}", run.client.log_artifact, run.id, ar.path,
                       ar.kind or None)
        for im in images:
            png = image_bytes(im)
            if png:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / f"{safe_name(im.key.replace('/', '_'))}.png"
                    path.write_bytes(png)
                    self._call(run, f"uploading image {im.key!r}", run.client.log_artifact, run.id, str(path),
                               "images")
        if end is not None:
            seq, ev = end
            status = _STATUS.get(ev.status, "FINISHED")
            if ev.dropped:
                self._send(run, [], [RunTag("flightlog.dropped_events", str(ev.dropped))], [])
            self._call(run, f"setting the status of run {start.name!r}", run.client.set_terminated, run.id,
                       status, int(ev.timestamp * 1000))
            state = self.state_of(run_id)
            state.update(ended=True, ended_seq=seq)
            self.save_state(run_id, state)
            self._runs.pop(run_id, None)

    def _param(self, run_id: str, key: str, value: str) -> str:
        if len(value) > MAX_PARAM_LENGTH:
            if (run_id, key) not in self._warned:
                self._warned.add((run_id, key))
                log.warning("MLflow: param %r of run %s is %d characters; truncated to MLflow's limit of %d",
                            key, run_id, len(value), MAX_PARAM_LENGTH)
            return value[:MAX_PARAM_LENGTH]
        return value

    def _send(self, run: _MlRun, params: list[Any], tags: list[Any], metrics: list[Any]) -> None:
        for m, p, t in chunk_batch(metrics, params, tags):
            what = f"logging {len(m)} metrics, {len(p)} params, {len(t)} tags"
            if p:
                what += " (params " + ", ".join(x.key for x in p[:10]) + (", …" if len(p) > 10 else "") + ")"
            self._call(run, what, run.client.log_batch, run.id, metrics=m, params=p, tags=t)

    def _call(self, run: _MlRun, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (PermanentBackendError, RetryableBackendError):
            raise
        except Exception as exc:
            err = classify_mlflow_error(exc, what)
            if err is exc:
                raise
            raise err from exc

    def close(self) -> None:
        self._runs.clear()
        self._clients.clear()


def _local_artifact_root(tracking: dict[str, Any]) -> str | None:
    """For a ``sqlite:///`` store, artifacts go beside the database (``<db dir>/mlartifacts``), not into
    the agent's working directory, which MLflow would use by default. Servers choose their own."""
    uri = str(tracking.get("mlflow_tracking_uri") or "")
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").absolute().as_uri()
