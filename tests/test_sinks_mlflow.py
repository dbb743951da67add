"""MLflow sink against a real `mlflow server` (sqlite store, temp artifact dir): every (key, step) exactly
once, params/tags/description/status, a bad param parks only the MLflow sink, and outages (server SIGKILLed,
agent SIGKILLed) lose and duplicate nothing."""
from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from conftest_backends import MlflowServer, drive, mlflow_server, run_events, write_wal  # noqa: F401

import flightlog
from flightlog.agent.sinks import Batch, MLflowTracker, SinkCursor
from flightlog.agent.sinks.memory import InMemorySink
from flightlog.agent.sinks.mlflow_sink import MAX_PARAMS, chunk_batch, classify_mlflow_error
from flightlog.agent.store import Store
from flightlog.proto.errors import PermanentBackendError, RetryableBackendError
from flightlog.proto.events import HyperParams, Metrics, RunEnd, RunStart
from flightlog.proto.paths import AgentPaths

pytestmark = [pytest.mark.timeout(240),
              # mlflow's sqlalchemy store (sqlite:/// URIs) uses an option sqlalchemy 2.1 deprecates
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_run(uri: str, experiment: str, run_id: str) -> Any:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = c.search_runs([exp.experiment_id], f"tags.`flightlog.run_id` = '{run_id}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for flightlog run {run_id}"
    return runs[0]


def assert_metrics_once(uri: str, ml_run_id: str, keys: list[str], steps: int) -> None:
    c = client(uri)
    for i, k in enumerate(keys):
        hist = c.get_metric_history(ml_run_id, k)
        counts = Counter(m.step for m in hist)
        missing = sorted(set(range(steps)) - set(counts))
        dupes = [s for s, n in counts.items() if n > 1]
        assert not missing, f"{k}: {len(missing)} steps missing, e.g. {missing[:5]}"
        assert not dupes, f"{k}: {len(dupes)} steps duplicated, e.g. {dupes[:5]}"
        assert all(m.value == float(m.step * 10 + i) for m in hist), f"{k}: wrong values"


def wait_metric_count(uri: str, experiment: str, run_id: str, key: str, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        try:
            run = find_run(uri, experiment, run_id)
            got = len(client(uri).get_metric_history(run.info.run_id, key))
        except Exception:  # not created yet, or the server is restarting
            got = 0
        if got >= n:
            return got
        time.sleep(0.25)
    return got


def test_chunking_respects_mlflow_limits() -> None:
    reqs = list(chunk_batch(list(range(2500)), list(range(250)), list(range(30))))
    assert all(len(m) <= 1000 and len(p) <= 100 and len(t) <= 100 and len(m) + len(p) + len(t) <= 1000
               for m, p, t in reqs)
    assert sum(len(m) for m, _, _ in reqs) == 2500 and sum(len(p) for _, p, _ in reqs) == 250


def test_error_classification(mlflow_server: MlflowServer) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    dead = client("http://127.0.0.1:9")
    try:
        dead.search_experiments()
    except Exception as exc:
        err = classify_mlflow_error(exc, "searching")
    assert isinstance(err, RetryableBackendError)
    assert isinstance(classify_mlflow_error(MlflowException("x", error_code=codes.TEMPORARILY_UNAVAILABLE), "w"),
                      RetryableBackendError)
    assert isinstance(classify_mlflow_error(MlflowException("x", error_code=codes.REQUEST_LIMIT_EXCEEDED), "w"),
                      RetryableBackendError)
    bad = classify_mlflow_error(
        MlflowException("Changing param values is not allowed. [{'key': 'lr', 'old_value': '1'}]",
                        error_code=codes.INVALID_PARAMETER_VALUE), "logging params")
    assert isinstance(bad, PermanentBackendError) and "'lr'" in str(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
def test_run_arrives_exactly_once(mlflow_server: MlflowServer, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    uri = mlflow_server.uri
    keys = ["loss", "acc", "nan", "inf"]
    params = {f"p{i}": i for i in range(MAX_PARAMS + 50)}
    params["long"] = "x" * 7000
    params["nested"] = {"opt": {"lr": 0.1}}
    tracking = {"mlflow_tracking_uri": uri, "mlflow_experiment_name": "exactly-once"}
    evs = run_events("mlrun1", "my run", tracking, steps=1200, keys=keys, sinks=["mlflow"], params=params,
                     status="failed", description="what this run is for", tags=["nlp", "big"])
    for e in evs:  # NaN and inf take MLflow's own path (NaN kept, inf saturated to the float maximum)
        if isinstance(e, Metrics):
            e.values["nan"], e.values["inf"] = float("nan"), float("inf")
    write_wal(tmp_path / "wal", evs, per_record=300)
    with caplog.at_level(logging.WARNING, "flightlog.agent.sinks"):
        [runner] = drive([MLflowTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok", runner.stats.last_error
    assert any("'long'" in r.message and "truncated" in r.message for r in caplog.records)
    run = find_run(uri, "exactly-once", "mlrun1")
    assert_metrics_once(uri, run.info.run_id, ["loss", "acc"], 1200)
    c = client(uri)
    nan_hist = c.get_metric_history(run.info.run_id, "nan")
    inf_hist = c.get_metric_history(run.info.run_id, "inf")
    assert len(nan_hist) == 1200 and all(m.value != m.value for m in nan_hist)
    assert len(inf_hist) == 1200 and all(m.value > 1e308 for m in inf_hist)
    first = c.get_metric_history(run.info.run_id, "loss")[0]
    assert first.timestamp == int(1.7e9 * 1000)  # the original timestamp, so a re-send deduplicates
    data = c.get_run(run.info.run_id)
    assert data.info.status == "FAILED" and data.info.run_name == "my run"
    assert data.data.params["p149"] == "149" and data.data.params["nested.opt.lr"] == "0.1"
    assert len(data.data.params["long"]) == 6000
    tags = data.data.tags
    assert tags["mlflow.note.content"] == "what this run is for"
    assert {"nlp", "big"} <= set(tags) and tags["team"] == "x"
    arts = [a.path for a in c.list_artifacts(run.info.run_id, "text/notes")]
    assert arts == ["text/notes/step_0.txt"]

    # A replay with a fresh sink (its registry lost): the same MLflow run is found by tag; nothing doubles.
    [again] = drive([MLflowTracker(tmp_path / "state2")], tmp_path / "wal", tmp_path / "db2.sqlite")
    assert again.stats.state == "ok"
    assert find_run(uri, "exactly-once", "mlrun1").info.run_id == run.info.run_id
    assert_metrics_once(uri, run.info.run_id, ["loss", "acc"], 1200)


def test_bad_param_quarantines_only_that_run_on_the_mlflow_sink(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """Once the refusal parked the MLflow sink for every run; now it quarantines this run on it, alone."""
    tracking = {"mlflow_tracking_uri": mlflow_server.uri, "mlflow_experiment_name": "bad-param"}
    evs = run_events("bad1", "bad", tracking, steps=50, keys=["loss"], sinks=["mlflow", "memory"], end=False)
    evs.append(HyperParams("bad1", {"lr": 0.5}))  # a changed value: MLflow answers HTTP 400
    evs += [Metrics("bad1", 50 + s, 1.8e9, {"loss": 1.0}) for s in range(50)]
    write_wal(tmp_path / "wal", evs)
    memory = InMemorySink("memory")
    ml, mem = drive([MLflowTracker(tmp_path / "state"), memory], tmp_path / "wal", tmp_path / "db.sqlite")
    assert "'lr'" in ml.stats.last_error and "INVALID_PARAMETER_VALUE" in ml.stats.last_error, ml.stats
    assert mem.stats.state == "ok" and len(memory.events) == len(evs), (mem.stats, len(memory.events))
    assert ml.core is not None and ml.core.quarantined_runs == {"bad1"}
    [row] = Store(tmp_path / "db.sqlite").quarantine_rows()
    assert (row["sink"], row["run_id"], row["scope"]) == ("mlflow", "bad1", "run") and "'lr'" in row["reason"]
    assert row["events"] == len(evs)  # the whole run waits in the quarantine for a replay after the fix
    assert ml.stats.cursor.seq == len(evs)  # the sink moved on: other runs are not held up


def test_local_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/local.db"
    sink = MLflowTracker(tmp_path / "state")
    sink.open()
    start = RunStart(run_id="loc", name="local", timestamp=1.7e9, description="d",
                     config={"tracking": {"mlflow_tracking_uri": uri}}, sinks=["mlflow"])
    evs = [start, *(Metrics("loc", s, 1.7e9 + s, {"m": float(s)}) for s in range(30)),
           RunEnd("loc", "killed", 1.7e9 + 40)]
    sink.write(Batch(list(enumerate(evs)), SinkCursor(0, 0, len(evs))))
    sink.write(Batch(list(enumerate(evs)), SinkCursor(0, 0, len(evs))))  # re-sent
    sink.close()
    run = find_run(uri, "local", "loc")
    assert run.info.status == "KILLED"
    assert sorted(m.step for m in client(uri).get_metric_history(run.info.run_id, "m")) == list(range(30))


def _tracker_config(tmp_path: Path, uri: str, experiment: str) -> dict[str, Any]:
    return {
        "tracking": {"use_tensorboard": False, "use_mlflow": True, "mlflow_tracking_uri": uri,
                     "mlflow_experiment_name": experiment},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "agent": {"autostart": False},
    }


def _latency_summary(lat: list[float]) -> str:
    lat = sorted(lat)
    return (f"n={len(lat)} median={statistics.median(lat) * 1e6:.1f}us "
            f"p99={lat[int(len(lat) * 0.99)] * 1e6:.1f}us max={lat[-1] * 1e6:.1f}us")


@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
def test_mlflow_server_killed_mid_run(mlflow_server: MlflowServer, agent_paths: AgentPaths, tmp_path: Path) -> None:
    keys = ["loss", "acc"]
    agent = AgentProcess(agent_paths).start()
    try:
        t = flightlog.ExperimentTracker("outage", _tracker_config(tmp_path, mlflow_server.uri, "outage"))
        lat_before: list[float] = []
        lat_during: list[float] = []
        step = 0

        def log_for(seconds: float, into: list[float]) -> None:
            nonlocal step
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(10):  # ~1000 steps/s: a training loop, not a flood the server needs minutes for
                    t0 = time.perf_counter()
                    t.log_metrics({k: float(step * 10 + i) for i, k in enumerate(keys)}, step=step)
                    into.append(time.perf_counter() - t0)
                    step += 1
                time.sleep(0.01)

        log_for(1.0, lat_before)
        assert wait_metric_count(mlflow_server.uri, "outage", t.run_id, "loss", 1, 60) >= 1
        mlflow_server.kill()
        log_for(2.0, lat_during)
        mlflow_server.start()  # same port, same sqlite store
        log_for(1.0, lat_during)
        t.finish()
        print(f"\nlog_metrics latency before the outage: {_latency_summary(lat_before)}")
        print(f"log_metrics latency during the outage: {_latency_summary(lat_during)}")
        got = wait_metric_count(mlflow_server.uri, "outage", t.run_id, "loss", step, 150)
        assert got == step
        run = find_run(mlflow_server.uri, "outage", t.run_id)
        assert_metrics_once(mlflow_server.uri, run.info.run_id, keys, step)
        deadline = time.monotonic() + 30
        while client(mlflow_server.uri).get_run(run.info.run_id).info.status != "FINISHED":
            assert time.monotonic() < deadline, "run status never reached FINISHED"
            time.sleep(0.2)
    finally:
        agent.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
def test_agent_killed_during_delivery(mlflow_server: MlflowServer, agent_paths: AgentPaths, tmp_path: Path) -> None:
    keys = ["loss", "acc", "lr"]
    steps = 4000
    agent = AgentProcess(agent_paths).start()
    with flightlog.experiment_tracking("agentkill", _tracker_config(tmp_path, mlflow_server.uri, "agentkill")) as t:
        for s in range(steps):
            t.log_metrics({k: float(s * 10 + i) for i, k in enumerate(keys)}, step=s)
        t.flush()
    partial = wait_metric_count(mlflow_server.uri, "agentkill", t.run_id, "loss", 1, 60)
    agent.kill()  # SIGKILL somewhere in the middle of delivery
    print(f"\nagent SIGKILLed with {partial} of {steps} 'loss' points delivered")
    agent = AgentProcess(agent_paths).start()
    try:
        assert wait_metric_count(mlflow_server.uri, "agentkill", t.run_id, "lr", steps, 150) == steps
        time.sleep(0.5)  # would a duplicate still arrive?
        run = find_run(mlflow_server.uri, "agentkill", t.run_id)
        assert_metrics_once(mlflow_server.uri, run.info.run_id, keys, steps)
    finally:
        agent.stop()


def test_one_write_sends_its_metric_requests_side_by_side_exactly_once(mlflow_server: MlflowServer,
                                                                       tmp_path: Path) -> None:
    """A write of several MLflow requests' worth of points posts them as JSON straight to the server, up to
    MAX_INFLIGHT at once; the same batch sent again (an ack lost) doubles nothing, and the run's latest value
    is the last step's, whatever order the requests landed in."""
    from flightlog.agent.sinks.mlflow_sink import MAX_INFLIGHT, MAX_METRICS

    tracking = {"mlflow_tracking_uri": mlflow_server.uri, "mlflow_experiment_name": "side-by-side"}
    steps = MAX_INFLIGHT * MAX_METRICS + 500  # more requests than are sent at once
    evs = run_events("mlpar", "par", tracking, steps=steps, keys=["loss"], sinks=["mlflow"], end=False)
    sink = MLflowTracker(tmp_path / "state")
    assert sink.batch_size >= MAX_INFLIGHT * MAX_METRICS
    sink.open()
    batch = Batch(list(enumerate(evs)), SinkCursor(), {"mlpar"})
    assert sink.write(batch).delivered == len(evs)
    assert sink._runs["mlpar"].post is not None  # the server's REST API, not a protobuf object per point
    assert sink.write(batch).delivered == len(evs)  # sent again after a lost ack
    run = find_run(mlflow_server.uri, "side-by-side", "mlpar")
    assert_metrics_once(mlflow_server.uri, run.info.run_id, ["loss"], steps)
    assert client(mlflow_server.uri).get_run(run.info.run_id).data.metrics["loss"] == float((steps - 1) * 10)
    sink.close()
