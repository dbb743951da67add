"""The MLflow sink: each run's events into an MLflow run (a tracking server URL or a local store such as
``sqlite:///``), through ``MlflowClient.log_batch`` within MLflow's request limits.

Exactly once: metrics keep their original timestamp (ms) and step, so a batch re-sent after a crash between
ack and cursor commit is deduplicated by MLflow's metric key; params re-logged with the same value and tags
are idempotent; the flightlog run id <-> MLflow run id mapping is kept in the sink's registry and as the tag
``flightlog.run_id``, so a replay after losing the registry reuses the same MLflow run.

Many nodes (one agent each, one tracking server): one creator. Only the agent of the node that hosts rank 0
(``RunStart.node_rank == 0``) creates the job's MLflow run; the others find it by the tag and wait until it
exists, so two agents starting at once never make two runs (a lookup-then-create by two creators has no
atomic step in MLflow's API to settle who won). Each agent's sink has its own cursor in its own WAL, and
every point keeps its timestamp and step, so an agent SIGKILLed and restarted re-sends at most its last
unacknowledged batch, which MLflow deduplicates. Each node's agent sees only its ranks' ends: it records its
node's end as the tag ``flightlog.node_end.<node>`` and then reads the run's tags; the one that finds every
node's tag ends the MLflow run (of two nodes ending at once, the later writer's read sees both tags).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from flightlog.agent.sinks._capture import capture_document, mlflow_source_tags
from flightlog.agent.store import RankEnd, combine_rank_ends
from flightlog.proto.config import TrackingConfig
from flightlog.proto.errors import BackendError, PermanentBackendError, RetryableBackendError
from flightlog.proto.events import (
    CRASHED,
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
from flightlog.proto.names import safe_relpath
from flightlog.proto.secrets import credential

from ._common import RunSinkBase, flatten, image_bytes, safe_name
from ._errors import ErrorTable, Rule

__all__ = ["MLflowTracker", "classify_mlflow_error", "mlflow_errors", "chunk_batch", "MAX_METRICS", "MAX_PARAMS", "MAX_TAGS",
           "MAX_PARAM_LENGTH"]

log = logging.getLogger("flightlog.agent.sinks")

#: MLflow's log_batch limits: per request, and 1000 entities in all.
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000
MAX_PARAM_LENGTH = 6000
#: Metric requests of one write sent side by side: MLflow caps a request at 1000 metrics, and one request at a
#: time leaves the server's other workers idle and the sink waiting a round trip per 1000 points.
MAX_INFLIGHT = 4
MAX_TAG_LENGTH = 8000
RUN_ID_TAG = "flightlog.run_id"
STATUS_TAG = "flightlog.status"
NODE_END_TAG = "flightlog.node_end."
#: A run's parent (a study's trial -> the study): the flightlog run id, turned into MLflow's own parent tag.
PARENT_TAG = "flightlog.parent_run_id"
#: flightlog's end statuses (proto.events.END_STATUSES) as MLflow's; a crash is a failure there.
_STATUS = {"completed": "FINISHED", "failed": "FAILED", "killed": "KILLED", CRASHED: "FAILED"}
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


def _retryable_mlflow(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    try:
        status = int(exc.get_http_status_code())  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        status = 500
    # A transport failure after MLflow's own retries (status codes lost) arrives as INTERNAL_ERROR too.
    return code in _RETRYABLE_CODES or status >= 500 or status == 429


@lru_cache(maxsize=1)
def mlflow_errors() -> ErrorTable:
    """MLflow's error table: connection trouble, 5xx and 429 retryable; other MlflowExceptions (4xx: a key
    or value MLflow's rules refuse, a changed param) permanent; the local store's OSErrors retryable."""
    import requests
    from mlflow.exceptions import MlflowException

    return ErrorTable("MLflow", [
        Rule((requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError), "retryable", causes=True),
        Rule((MlflowException,), "retryable", when=_retryable_mlflow),
        Rule((MlflowException,), "permanent"),
        Rule((OSError,), "retryable"),
        # The client could not encode the request (a step past int64, a value of the wrong type): this input
        # fails the same way every time.
        Rule((ValueError, TypeError, OverflowError), "permanent"),
    ])


def classify_mlflow_error(exc: Exception, what: str) -> BackendError | None:
    """An MLflow (or transport) error as a flightlog BackendError by ``mlflow_errors()``; a refusal names the
    offending key when MLflow's message does. None: an exception the table does not know."""
    verdict = mlflow_errors().verdict(exc)
    if verdict is None:
        return None
    if isinstance(exc, BackendError):
        return exc
    text = _short(exc)
    if verdict == "retryable":
        if hasattr(exc, "error_code"):
            return RetryableBackendError(f"MLflow error while {what}: {text}")
        return RetryableBackendError(f"MLflow unreachable while {what}: {text}")
    m = _KEY_IN_MESSAGE.search(str(exc))
    key = next((g for g in m.groups() if g), None) if m else None
    where = f" (key {key!r})" if key else ""
    return PermanentBackendError(f"MLflow refused {what}{where}: {getattr(exc, 'error_code', '')}: {text}")


def _short(exc: BaseException, limit: int = 500) -> str:
    s = str(exc)
    return s if len(s) <= limit else s[:limit] + "…"


def _param_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


#: A metric as this sink collects it: (key, value, timestamp in ms, step).
_Point = tuple[str, float, int, int]
_JSON_FLOAT = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _point_json(p: _Point) -> dict[str, Any]:
    v = p[1]
    if v != v:
        value: Any = "NaN"  # proto3 JSON's words for the non-finite doubles (MLflow's own client sends these)
    else:
        value = _JSON_FLOAT.get(v, v)
    return {"key": p[0], "value": value, "timestamp": p[2], "step": p[3]}


def _rest_poster(client: Any) -> Callable[[str, list[_Point]], None] | None:
    """``log-batch`` of metrics straight to a tracking server, as the JSON MLflow's REST store would send (its
    own host credentials, TLS settings and error checks), without a protobuf object and a protobuf-to-JSON
    pass per point (17 µs a point in MlflowClient's path here, 1.3 µs this way). None: not a plain
    REST store (a local ``sqlite:///`` store, a vendor's store): the client's own log_batch is used."""
    try:
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        store = client._tracking_client.store
        endpoint, method = store._METHOD_TO_INFO[LogBatch]
    except (ImportError, AttributeError, KeyError, TypeError):
        return None  # another MLflow version's internals: the client's path still works
    if type(store) is not RestStore:
        return None

    def post(run_id: str, points: list[_Point]) -> None:
        body = {"run_id": run_id, "metrics": [_point_json(p) for p in points]}
        send: Any = http_request  # untyped in MLflow
        verify_rest_response(send(store.get_host_creds(), endpoint, method, json=body), endpoint)

    return post


class _MlRun:
    def __init__(self, client: Any, mlflow_run_id: str, uri: str) -> None:
        self.client = client
        self.id = mlflow_run_id
        self.uri = uri
        self.post = _rest_poster(client)


class MLflowTracker(RunSinkBase):
    """Sink ``mlflow``: one MLflow run per flightlog run; experiment ``tracking.mlflow_experiment_name``
    or the run's name; tracking URI ``tracking.mlflow_tracking_uri``."""

    name = "mlflow"
    #: Events per write: at one value per event, MAX_INFLIGHT full requests side by side.
    batch_size = MAX_INFLIGHT * MAX_METRICS

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
                raise mlflow_errors().translate(exc, f"connecting to {uri}") from exc
            self._clients[uri] = c
        return c

    # --- runs ---

    def _run(self, run_id: str, start: RunStart) -> _MlRun:
        run = self._runs.get(run_id)
        if run is not None:
            return run
        tracking = self.tracking(start)
        uri = tracking.mlflow_tracking_uri
        client = self._client(uri)
        state = self.state_of(run_id)
        ml_id = state.get("mlflow_run_id") if state.get("uri") == uri else None
        try:
            if ml_id is None:
                ml_id = self._find_or_create(client, start, tracking)
                state.update(uri=uri, mlflow_run_id=ml_id)
                self.save_state(run_id, state)
        except BackendError:
            raise
        except Exception as exc:
            err = classify_mlflow_error(exc, f"creating the MLflow run for {start.name!r}")
            if err is None:
                raise
            raise err from exc
        run = _MlRun(client, ml_id, uri)
        self._runs[run_id] = run
        return run

    def _find_or_create(self, client: Any, start: RunStart, tracking: TrackingConfig) -> str:
        exp_name = tracking.mlflow_experiment_name or start.name
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
        found = _tagged_run(client, exp_id, start.run_id)
        if found is None and start.world_size > 1 and start.node_rank != 0:
            found = _wait_for_creator(client, exp_id, start)
        if found is not None:
            return found
        tags = {RUN_ID_TAG: start.run_id, "flightlog.host": start.host, "flightlog.rank": str(start.rank),
                "flightlog.pid": str(start.pid)}
        if start.node:
            tags["flightlog.node"] = start.node
        if start.config_hash:
            tags["flightlog.config_hash"] = start.config_hash
        if start.description:
            tags["mlflow.note.content"] = start.description[:MAX_TAG_LENGTH]
        for t in start.tags:
            tags[str(t)] = ""
        tags.update(mlflow_source_tags(start, MAX_TAG_LENGTH))  # git commit, source, command line
        run = client.create_run(exp_id, start_time=int(start.timestamp * 1000), tags=tags, run_name=start.name)
        return run.info.run_id  # type: ignore[no-any-return]

    # --- writing ---

    def _write_run(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        with mlflow_credentials(self.tracking(start)):
            self._write_authenticated(run_id, start, events)

    def _write_authenticated(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        from mlflow.entities import Param, RunTag

        run = self._run(run_id, start)
        self._upload_capture(run_id, run, start)
        got = self._collect(run_id, events)
        if got.tags.get(PARENT_TAG):
            parent = self._mlflow_id_of(run, got.tags[PARENT_TAG])
            if parent:
                got.tags["mlflow.parentRunId"] = parent
        for group in got.param_groups:
            self._send(run, [Param(k, v) for k, v in group.items()], [], [])
        self._send(run, [Param(k, v) for k, v in got.params.items()],
                   [RunTag(k, v) for k, v in got.tags.items()], got.metrics)
        self._upload(run, got)
        end = got.end
        if end is not None and start.nodes > 1 and start.world_size > 1:
            run_end = self._node_end(run, start, end[1])  # None: another node's ranks still run
            end = None if run_end is None else (end[0], run_end)
        if end is not None:
            seq, ev = end
            status = _STATUS.get(ev.status, "FINISHED")
            # MLflow's statuses have no "crashed": the tag keeps flightlog's own word (and why, if known).
            end_tags = [RunTag(STATUS_TAG, ev.status)]
            if ev.error:
                end_tags.append(RunTag("flightlog.error", ev.error[-MAX_TAG_LENGTH:]))
            if ev.dropped:
                end_tags.append(RunTag("flightlog.dropped_events", str(ev.dropped)))
            self._send(run, [], end_tags, [])
            self._call(run, f"setting the status of run {start.name!r}", run.client.set_terminated, run.id,
                       status, int(ev.timestamp * 1000))
            state = self.state_of(run_id)
            state.update(ended=True, ended_seq=seq)
            self.save_state(run_id, state)
            self._runs.pop(run_id, None)

    def _upload_capture(self, run_id: str, run: _MlRun, start: RunStart) -> None:
        """The run's full capture (environment with its packages, git, command) as the artifact
        ``flightlog/capture.json``, once per run."""
        state = self.state_of(run_id)
        if state.get("capture_uploaded") or not start.metadata:
            return
        self._call(run, "uploading the run's capture", run.client.log_dict, run.id, capture_document(start),
                   "flightlog/capture.json")
        state["capture_uploaded"] = True
        self.save_state(run_id, state)

    def _node_end(self, run: _MlRun, start: RunStart, ev: RunEnd) -> RunEnd | None:
        """Record this node's end; the run's end once every node's is recorded (read back after writing)."""
        from mlflow.entities import RunTag

        mine = json.dumps([ev.status, ev.error[-(MAX_TAG_LENGTH // 2):], ev.timestamp, ev.dropped])
        self._send(run, [], [RunTag(f"{NODE_END_TAG}{start.node_rank}", mine)], [])
        tags = self._call(run, "reading the node ends of the run", run.client.get_run, run.id).data.tags
        ends = _node_ends(tags)
        final = combine_rank_ends(start.run_id, start.nodes, ends)
        if final is None:
            return None
        error = "\n".join(e.error for _, e in sorted(ends.items()) if e.error)  # each names its ranks already
        return RunEnd(final.run_id, final.status, final.timestamp, error, final.dropped, final.rank)

    def _mlflow_id_of(self, run: _MlRun, flightlog_run_id: str) -> str | None:
        """The MLflow run id of another flightlog run (open in this sink, or found in ``run``'s experiment)."""
        known = self._runs.get(flightlog_run_id)
        if known is not None:
            return known.id
        info = self._call(run, "reading the MLflow run's experiment", run.client.get_run, run.id).info
        found = self._call(run, f"finding the parent run {flightlog_run_id!r}", run.client.search_runs,
                           [info.experiment_id], f"tags.`{RUN_ID_TAG}` = '{flightlog_run_id}'", max_results=1)
        return str(found[0].info.run_id) if found else None

    def _collect(self, run_id: str, events: list[tuple[int, Event]]) -> _Collected:
        """A run's events as MLflow entities and uploads, in the order MLflow must see them."""
        got = _Collected()
        add = got.metrics.append
        for seq, ev in events:
            if isinstance(ev, (Metrics, SystemStats)):  # the monitor's keys already read system/...
                ts, step = int(ev.timestamp * 1000), ev.step
                for k, v in ev.values.items():
                    add((k, float(v), ts, step))
            elif isinstance(ev, HyperParams):
                if ev.config_hash:
                    got.tags["flightlog.config_hash"] = ev.config_hash
                for k, v in flatten(ev.params).items():
                    value = self._param(run_id, k, _param_value(v))
                    if got.params.get(k, value) != value:
                        # A changed value: send what came before so MLflow judges them in order (and refuses).
                        got.param_groups.append(got.params)
                        got.params = {}
                    got.params[k] = value
            elif isinstance(ev, Tags):
                for k, tag in ev.tags.items():
                    got.tags[k] = str(tag)[:MAX_TAG_LENGTH]
            elif isinstance(ev, Text):
                got.texts.append(ev)
            elif isinstance(ev, CheckpointSaved):
                ts = int(ev.timestamp * 1000)
                for k, v in ev.metrics.items():
                    add((f"checkpoint/{k}", float(v), ts, ev.step))
                got.tags["flightlog.last_checkpoint"] = ev.path[:MAX_TAG_LENGTH]
            elif isinstance(ev, Artifact):
                got.artifacts.append(ev)
            elif isinstance(ev, Image):  # plots: artifacts under images/ (MLflow has no histogram type: skipped)
                got.images.append(ev)
            elif isinstance(ev, Alert):
                got.tags[f"flightlog.alert.{ev.level}"] = ev.message[:MAX_TAG_LENGTH]
            elif isinstance(ev, RunEnd):
                got.end = (seq, ev)
        return got

    def _upload(self, run: _MlRun, got: _Collected) -> None:
        for tx in got.texts:
            # Keys and artifact types become artifact paths: encoded, so none climbs out of the run's root.
            self._call(run, "logging text " + repr(tx.key), run.client.log_text, run.id, tx.text,
                       f"text/{safe_relpath(tx.key) or 'text'}/step_{tx.step}.txt")
        for ar in got.artifacts:
            if not os.path.exists(ar.path):
                log.warning("MLflow: artifact %s (%s) no longer exists; not uploaded", ar.name, ar.path)
                continue
            self._call(run, f"uploading artifact {ar.path}", run.client.log_artifact, run.id, ar.path,
                       safe_relpath(ar.kind or "") or None)
        for im in got.images:
            png = image_bytes(im)
            if png:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / f"{safe_name(im.key.replace('/', '_'))}.png"
                    path.write_bytes(png)
                    self._call(run, f"uploading image {im.key!r}", run.client.log_artifact, run.id, str(path),
                               "images")

    def _param(self, run_id: str, key: str, value: str) -> str:
        if len(value) > MAX_PARAM_LENGTH:
            if (run_id, key) not in self._warned:
                self._warned.add((run_id, key))
                log.warning("MLflow: param %r of run %s is %d characters; truncated to MLflow's limit of %d",
                            key, run_id, len(value), MAX_PARAM_LENGTH)
            return value[:MAX_PARAM_LENGTH]
        return value

    def _send(self, run: _MlRun, params: list[Any], tags: list[Any], metrics: list[_Point]) -> None:
        """Params and tags first, one request after another (a changed param must be judged in order), then
        the metrics, up to MAX_INFLIGHT requests at once. The write returns once every request is acknowledged,
        and raises if any failed: the engine sends the whole batch again and MLflow drops the points it
        already has (same key, step, timestamp and value), so exactly-once holds whatever order the requests
        landed in; MLflow orders a metric's history by step and timestamp, not by arrival."""
        requests = list(chunk_batch(metrics, params, tags))
        for m, p, t in requests:
            if p or t:
                what = f"logging {len(m)} metrics, {len(p)} params, {len(t)} tags"
                if p:
                    what += " (params " + ", ".join(x.key for x in p[:10]) + (", …" if len(p) > 10 else "") + ")"
                self._call(run, what, run.client.log_batch, run.id, metrics=self._entities(m), params=p, tags=t)
        chunks = [m for m, p, t in requests if m and not (p or t)]
        if len(chunks) <= 1:
            for m in chunks:
                self._send_metrics(run, m)
            return
        with ThreadPoolExecutor(min(MAX_INFLIGHT, len(chunks)), thread_name_prefix="flightlog-mlflow") as pool:
            futures = [pool.submit(self._send_metrics, run, m) for m in chunks]
        for f in futures:
            f.result()  # the first failure, translated by _call; the pool has waited for all of them

    def _send_metrics(self, run: _MlRun, points: list[_Point]) -> None:
        what = f"logging {len(points)} metrics"
        if run.post is not None:
            self._call(run, what, run.post, run.id, points)
        else:
            self._call(run, what, run.client.log_batch, run.id, metrics=self._entities(points))

    @staticmethod
    def _entities(points: list[_Point]) -> list[Any]:
        from mlflow.entities import Metric

        return [Metric(*p) for p in points]

    def _call(self, run: _MlRun, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackendError:
            raise
        except Exception as exc:
            err = classify_mlflow_error(exc, what)
            if err is None:
                raise  # unknown: the engine retries it on its capped schedule and shows the traceback once
            raise err from exc

    def _forget_run(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def close(self) -> None:
        self._runs.clear()
        self._clients.clear()


@dataclass
class _Collected:
    metrics: list[_Point] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    texts: list[Text] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    end: tuple[int, RunEnd] | None = None


def _node_ends(tags: dict[str, str]) -> dict[int, RankEnd]:
    """The node ends recorded in a run's tags; a tag that is not one of ours (edited by hand) is skipped."""
    ends: dict[int, RankEnd] = {}
    for key, value in tags.items():
        node = key[len(NODE_END_TAG):]
        if not key.startswith(NODE_END_TAG) or not node.isascii() or not node.isdigit():
            continue
        try:
            status, error, ts, dropped = json.loads(value)
            ends[int(node)] = RankEnd(str(status), str(error), float(ts), int(dropped))
        except (ValueError, TypeError, RecursionError):  # RecursionError: JSON nested thousands deep
            log.warning("MLflow: tag %s=%r is not a node end; ignored", key, value[:80])
    return ends


def _tagged_run(client: Any, exp_id: str, run_id: str) -> str | None:
    found = client.search_runs([exp_id], f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
    return found[0].info.run_id if found else None


#: How long a node without rank 0 looks for the job's MLflow run in one delivery, before the runner's
#: backoff takes over (the node of rank 0 creates it with its first batch, normally within a second).
CREATOR_WAIT_SECONDS = 10.0


def _wait_for_creator(client: Any, exp_id: str, start: RunStart) -> str:
    deadline = time.monotonic() + CREATOR_WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.25)
        found = _tagged_run(client, exp_id, start.run_id)
        if found is not None:
            return found
    raise RetryableBackendError(
        f"no MLflow run tagged {RUN_ID_TAG}={start.run_id} yet: node {start.node or start.node_rank} waits for the "
        "agent of node 0 (where rank 0 runs) to create it; if node 0 has no flightlog agent, start one there")


_CREDENTIAL_ENV = {"mlflow_username": "MLFLOW_TRACKING_USERNAME", "mlflow_password": "MLFLOW_TRACKING_PASSWORD",
                   "mlflow_token": "MLFLOW_TRACKING_TOKEN"}


@contextmanager
def mlflow_credentials(tracking: TrackingConfig) -> Iterator[None]:
    """MLflow's own basic-auth or token variables, set in this (the agent's) process only while one run's
    requests are made (MLflow reads them per request; this sink's requests at any moment are all one run's),
    so each run's server gets its credentials and no other server sees them. Nothing else is touched when a
    run names none."""
    wanted = {env: credential(value, f"tracking.{key}", PermanentBackendError)
              for key, env in _CREDENTIAL_ENV.items() if (value := getattr(tracking, key))}
    if not wanted:
        yield
        return
    saved = {env: os.environ.get(env) for env in _CREDENTIAL_ENV.values()}
    for env in _CREDENTIAL_ENV.values():
        os.environ.pop(env, None)
    os.environ.update(wanted)
    try:
        yield
    finally:
        for env, old in saved.items():
            if old is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = old


def _local_artifact_root(tracking: TrackingConfig) -> str | None:
    """For a ``sqlite:///`` store, artifacts go beside the database (``<db dir>/mlartifacts``), not into
    the agent's working directory, which MLflow would use by default. Servers choose their own."""
    uri = tracking.mlflow_tracking_uri
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").absolute().as_uri()
