"""Optuna (issue 14, item 3): a 20-trial study with a pruner through ``FlightlogCallback``: one parent run for
the study, one child run per trial with its params, value, intermediate values and state; pruned trials
marked; the parent link in the local store and, as ``mlflow.parentRunId``, on a real MLflow server."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from conftest_backends import MlflowServer, approx_points, ended_mlflow_runs, mlflow_server  # noqa: F401
from test_crashed import wait_status

from flightlog.agent.sinks.wandb_sink import _group_of
from flightlog.agent.store import Store
from flightlog.proto.events import Metrics, Tags

optuna = pytest.importorskip("optuna")
from flightlog.integrations.optuna import PARENT_TAG, FlightlogCallback  # noqa: E402

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]

N = 20


def test_study_is_a_parent_run_with_a_child_per_trial(agent: AgentProcess, mlflow_server: MlflowServer,  # noqa: F811
                                                      tmp_path: Path) -> None:
    from mlflow import MlflowClient

    config = {"tracking": {"use_tensorboard": False, "use_mlflow": True, "mlflow_tracking_uri": mlflow_server.uri},
              "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")}, "agent": {"autostart": False}}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="tiny-study", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    with FlightlogCallback(config) as fl:
        def objective(trial: Any) -> float:
            x = trial.suggest_float("x", -4.0, 4.0)
            for step in range(4):
                loss = (x - 1.0) ** 2 + 1.0 / (step + 1)
                if fl.report(trial, loss, step):
                    raise optuna.TrialPruned()
            return loss

        study.optimize(objective, n_trials=N, callbacks=[fl])
        parent_id = fl.parent.run_id if fl.parent else ""
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and len(study.trials) == N  # the pruner did prune: the test covers the marking

    paths = agent.paths
    wait_status(paths, parent_id, "completed")
    for t in study.trials:
        wait_status(paths, f"{parent_id}-t{t.number}", "completed")
    with Store(paths.store, readonly=True) as store:
        parent = store.run(parent_id)
        assert parent["name"] == "tiny-study"
        assert [v for _s, v in store.metric_series(parent_id, "best_value")][-1] == pytest.approx(study.best_value)
        for t in study.trials:
            row = store.run(f"{parent_id}-t{t.number}")
            assert row["tags_kv"][PARENT_TAG] == parent_id
            assert row["tags_kv"]["optuna.state"] == t.state.name
            assert row["params"] == {"params": {"x": t.params["x"]}}
            series = store.metric_series(row["run_id"], "intermediate")
            assert series == approx_points(sorted(t.intermediate_values.items()))
            last = max(t.intermediate_values)
            assert store.metric_series(row["run_id"], "value") == [(last, pytest.approx(t.value))]
            if t.state == optuna.trial.TrialState.PRUNED:
                assert row["tags_kv"]["optuna.pruned"] == "true" and last < 3

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    (ml_parent,) = ended_mlflow_runs(client, "tiny-study", parent_id)
    exp = client.get_experiment_by_name("tiny-study")
    deadline = time.monotonic() + 120
    while True:
        children = client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=100)
        if (len(children) == N and all(r.info.status == "FINISHED" for r in children)
                and all("optuna.state" in r.data.tags for r in children)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(children) == N
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {ml_parent.info.run_id}
    marked = sorted(int(r.data.tags["optuna.trial"]) for r in children if r.data.tags["optuna.state"] == "PRUNED")
    assert marked == sorted(t.number for t in pruned)


def test_wandb_group_is_read_from_the_tags_sent_with_the_start() -> None:
    events: list[tuple[int, Any]] = [(1, Metrics("r-t1", 0, 1.0, {"x": 1.0})), (2, Tags("r-t1", {PARENT_TAG: "r"}, 1.0))]
    assert _group_of(events) == "r"
    assert _group_of(events[:1]) is None


def test_trials_are_grouped_under_the_study_in_wandb(agent: AgentProcess, tmp_path: Path) -> None:
    from conftest_backends import read_wandb_log, wandb_exit_codes, wandb_logs

    from flightlog.agent.sinks.wandb_sink import wandb_run_id

    wb = tmp_path / "wandb"
    config = {"tracking": {"use_tensorboard": False, "use_wandb": True, "wandb_mode": "offline", "wandb_dir": str(wb)},
              "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")}, "agent": {"autostart": False}}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="wb-study", sampler=optuna.samplers.RandomSampler(seed=0))
    with FlightlogCallback(config) as fl:
        study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2, callbacks=[fl])
        parent_id = fl.parent.run_id if fl.parent else ""
    for t in study.trials:
        child = wandb_run_id(f"{parent_id}-t{t.number}")
        assert wandb_exit_codes(wb, child) == [0]
        groups = {r.run.run_group for p in wandb_logs(wb, child) for r in read_wandb_log(p)
                  if r.WhichOneof("record_type") == "run"}
        assert groups == {parent_id}
