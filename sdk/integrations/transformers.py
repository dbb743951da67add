"""Hugging Face ``Trainer``: ``FlightlogCallback``, and ``report_to="flightlog"``.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[FlightlogCallback("my-exp", "config.yaml")])
    # or, after `import flightlog.integrations.transformers`:  TrainingArguments(..., report_to="flightlog")

The training arguments and the model's config are the run's hyper-parameters (``args.*``, ``model.*``);
every ``on_log`` dict's numbers are metrics at the global step; every save is also a flightlog checkpoint
(model, optimizer and scheduler staged into shared memory and written by the agent, no pickle; the latest
evaluation metrics recorded with it) and the Trainer's own checkpoint folder is tagged; the run ends at
``on_train_end``. An exception out of ``Trainer.train()`` reaches no callback: end such a run with
``callback.finish("failed")`` (otherwise it ends ``completed`` at exit).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from flightlog.integrations._common import ConfigSource, LazyRun, numbers, plain, tracks_this_rank
from flightlog.tracker import ExperimentTracker

__all__ = ["FlightlogCallback", "register_report_to"]


class FlightlogCallback(TrainerCallback):
    """``FlightlogCallback(name=None, config=None, *, checkpoints=True, **tracker_options)``. ``name``
    defaults to ``args.run_name`` (else the output folder's name); with ``report_to="flightlog"`` the
    Trainer builds it without arguments (config: the ``FLIGHTLOG_*`` environment, e.g.
    ``FLIGHTLOG_TRACKING__USE_MLFLOW=true``). ``checkpoints=False`` only tags the Trainer's folders."""

    def __init__(self, name: str | None = None, config: ConfigSource = None, *, checkpoints: bool = True,
                 **tracker_options: Any) -> None:
        self._name = name
        self._run = LazyRun(name or "transformers", config, tracker_options)
        self._checkpoints = checkpoints
        self._eval: dict[str, float] = {}
        self._logged_params = False

    @property
    def tracker(self) -> ExperimentTracker | None:
        """The run's tracker once training began on a rank that logs, else None."""
        return self._run.tracker

    def _tracker(self, args: Any, state: Any) -> ExperimentTracker | None:
        if not tracks_this_rank(0 if getattr(state, "is_world_process_zero", True) else 1):
            return None
        if self._run.tracker is None and self._name is None:
            self._run.name = getattr(args, "run_name", None) or os.path.basename(
                os.path.normpath(getattr(args, "output_dir", None) or "transformers")) or "transformers"
        return self._run.get()

    # --- the Trainer's events ------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tracker = self._tracker(args, state)
        if tracker is None or self._logged_params:
            return
        params: dict[str, Any] = {"args": plain(args.to_sanitized_dict())}
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            params["model"] = plain(model_config.to_dict())
        tracker.log_hyperparameters(params)
        self._logged_params = True

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        tracker = self._tracker(args, state)
        if tracker is None or not logs:
            return
        values = numbers(logs)
        self._eval.update({k: v for k, v in values.items() if k.startswith("eval_")})
        if values:
            tracker.log_metrics(values, step=int(state.global_step))

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                lr_scheduler: Any = None, **kwargs: Any) -> None:
        tracker = self._tracker(args, state)
        if tracker is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        tracker.set_tags({"transformers.checkpoint": os.path.abspath(folder)})
        if self._checkpoints and model is not None:
            tracker.save_checkpoint(model, int(state.epoch or 0), int(state.global_step), optimizer,
                                    scheduler=lr_scheduler, **self._eval)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the model's checkpoints are waited for by finish(); a later evaluate() continues the run
        self.finish("completed")

    def finish(self, status: str = "completed", error: str = "") -> None:
        """End the run now (``failed`` after ``Trainer.train()`` raised, say)."""
        self._run.finish(status, error)


def register_report_to() -> None:
    """Make ``report_to="flightlog"`` work. transformers looks report_to names up in
    ``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK`` (a module-level dict, in 4.40
    through 5.x) and offers no registration call, so this adds ``"flightlog"`` to that dict; importing this
    module calls it. (``report_to="all"`` lists installed libraries only and does not include flightlog.)"""
    from transformers.integrations import integration_utils

    integration_utils.INTEGRATION_TO_CALLBACK.setdefault("flightlog", FlightlogCallback)


register_report_to()
