"""Optuna: ``FlightlogCallback`` for ``study.optimize`` — one parent run per study, one child run per trial.

    with FlightlogCallback("config.yaml") as fl:
        def objective(trial):
            for epoch in range(10):
                loss = train_one_epoch(trial.suggest_float("lr", 1e-4, 1e-1, log=True))
                if fl.report(trial, loss, epoch):      # trial.report(), mirrored to the trial's run
                    raise optuna.TrialPruned()
            return loss
        study.optimize(objective, n_trials=20, callbacks=[fl])

A trial's run holds its params (hyper-parameters), its value (metric ``value``, at its last reported step),
its intermediate values (the metric ``intermediate``, one point per reported step), its state (tag ``optuna.state``: a pruned trial
is ``PRUNED``; a failed one also ends ``failed``) and the tag ``flightlog.parent_run_id``, which the MLflow
sink turns into ``mlflow.parentRunId`` and the W&B sink into the run's group. The study's run logs
``best_value`` and ``trial_value`` per trial number and ends when the ``with`` block does (or ``finish()``).
"""
from __future__ import annotations

import json
import threading
from typing import Any

import msgspec

from flightlog.integrations._common import ConfigSource, plain
from flightlog.proto.config import Config, load_config
from flightlog.tracker import ExperimentTracker, exit_status

__all__ = ["FlightlogCallback", "PARENT_TAG"]

#: The tag that links a trial's run to its study's run in every backend.
PARENT_TAG = "flightlog.parent_run_id"


class FlightlogCallback:
    """``FlightlogCallback(config=None, *, study_name=None, metric_name="value", **tracker_options)``: every
    argument optional. ``study_name`` names the study's run (default: the study's own name); ``tracker_options``
    go to each ``ExperimentTracker`` (``tags=``, ``description=``; ``run_id=`` names the study's run). Unless
    the config names an MLflow experiment, the study's and its trials' runs share one named after the study."""

    def __init__(self, config: ConfigSource = None, *, study_name: str | None = None, metric_name: str = "value",
                 **tracker_options: Any) -> None:
        self._config: Config = load_config(config)
        self._study_name = study_name
        self._metric = metric_name
        self._options = dict(tracker_options)
        self._parent_id: str | None = self._options.pop("run_id", None)
        self.parent: ExperimentTracker | None = None
        self._trials: dict[int, ExperimentTracker] = {}
        self._reported: dict[int, set[int]] = {}
        self._lock = threading.Lock()  # study.optimize(n_jobs=k) runs trials, and this callback, on k threads

    # --- runs ----------------------------------------------------------------------------------

    def _study_run(self, study: Any) -> ExperimentTracker:
        with self._lock:
            if self.parent is None:
                name = self._study_name or study.study_name
                if self._config.tracking.mlflow_experiment_name is None:
                    tracking = msgspec.structs.replace(self._config.tracking, mlflow_experiment_name=name)
                    self._config = msgspec.structs.replace(self._config, tracking=tracking)
                self.parent = ExperimentTracker(name, self._config, run_id=self._parent_id, **self._options)
                self._parent_id = self.parent.run_id
                directions = [d.name for d in getattr(study, "directions", [])]
                self.parent.log_hyperparameters({"optuna": {
                    "directions": directions, "sampler": type(study.sampler).__name__,
                    "pruner": type(getattr(study, "pruner", None)).__name__}})
                self.parent.set_tags({"optuna.study": study.study_name})
            return self.parent

    def tracker(self, trial: Any) -> ExperimentTracker:
        """The running trial's run (started on first use): log anything else about the trial into it."""
        return self._trial_run(trial.study, trial)

    def _trial_run(self, study: Any, trial: Any) -> ExperimentTracker:
        parent = self._study_run(study)
        with self._lock:
            tracker = self._trials.get(trial.number)
            if tracker is None:
                tracker = ExperimentTracker(f"{parent.metadata.name}-trial-{trial.number}", self._config,
                                            run_id=f"{parent.run_id}-t{trial.number}", **self._options)
                # right after the run's start: the W&B sink reads the group from it when it opens the run
                tracker.set_tags({PARENT_TAG: parent.run_id, "optuna.study": study.study_name,
                                  "optuna.trial": str(trial.number)})
                self._trials[trial.number] = tracker
                self._reported[trial.number] = set()
            return tracker

    # --- inside the objective ------------------------------------------------------------------

    def report(self, trial: Any, value: float, step: int) -> bool:
        """``trial.report(value, step)``, mirrored to the trial's run as the metric ``intermediate``;
        returns ``trial.should_prune()`` (raise ``optuna.TrialPruned`` when it is true)."""
        trial.report(value, step)
        tracker = self.tracker(trial)
        tracker.log_metrics({"intermediate": float(value)}, step=int(step))
        self._reported[trial.number].add(int(step))
        return bool(trial.should_prune())

    # --- after each trial ----------------------------------------------------------------------

    def __call__(self, study: Any, trial: Any) -> None:
        """Optuna calls this with the finished trial (a ``FrozenTrial``)."""
        import optuna

        parent = self._study_run(study)
        tracker = self._trial_run(study, trial)
        state = trial.state.name
        if trial.params:
            tracker.log_hyperparameters({"params": plain(trial.params)})
        done = self._reported.get(trial.number, set())
        for step, value in sorted(trial.intermediate_values.items()):
            if step not in done:
                tracker.log_metrics({"intermediate": float(value)}, step=int(step))
        values = trial.values or []  # a pruned trial's value is its last intermediate value (Optuna's rule)
        last = max([*trial.intermediate_values, *done], default=0)
        if len(values) == 1:
            tracker.log_metrics({self._metric: float(values[0])}, step=int(last))
        elif values:
            tracker.log_metrics({f"{self._metric}_{i}": float(v) for i, v in enumerate(values)}, step=int(last))
        tracker.set_tags({"optuna.state": state, **({"optuna.pruned": "true"} if state == "PRUNED" else {})})
        error = str(trial.system_attrs.get("fail_reason", "")) if state == "FAIL" else ""
        with self._lock:
            self._trials.pop(trial.number, None)
            self._reported.pop(trial.number, None)
        tracker.finish("failed" if state == "FAIL" else "completed", error)
        if len(values) == 1:
            parent.log_metrics({"trial_value": float(values[0])}, step=trial.number)
        try:
            best = study.best_trial
        except (ValueError, RuntimeError):  # no completed trial yet, or a multi-objective study
            best = None
        if best is not None and best.state == optuna.trial.TrialState.COMPLETE and best.value is not None:
            parent.log_metrics({"best_value": float(best.value)}, step=trial.number)
            parent.set_tags({"optuna.best_trial": str(best.number),
                             "optuna.best_params": json.dumps(plain(best.params), sort_keys=True)[:5000]})

    # --- the study's end -----------------------------------------------------------------------

    def finish(self, status: str = "completed", error: str = "") -> None:
        """End the study's run (and any trial run still open: ``killed``)."""
        with self._lock:
            open_trials, self._trials = list(self._trials.values()), {}
            parent, self.parent = self.parent, None
        for t in open_trials:
            t.finish("killed", "the study ended before this trial finished")
        if parent is not None:
            parent.finish(status, error)

    def __enter__(self) -> FlightlogCallback:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(*exit_status(exc_type, exc, tb))
