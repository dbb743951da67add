"""What the framework integrations share: which ranks track, plain hyper-parameters, and a run that a
framework may end and then continue (an evaluation after training logs into the same run)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from flightlog.distributed import job_identity
from flightlog.proto.config import Config, load_config
from flightlog.tracker import ExperimentTracker

__all__ = ["tracks_this_rank", "plain", "numbers", "LazyRun", "STATUS"]

#: A framework's word for how training ended -> flightlog's status.
STATUS = {"success": "completed", "finished": "completed", "completed": "completed", "failed": "failed",
          "killed": "killed", "interrupted": "killed"}

ConfigSource = Config | Mapping[str, Any] | str | os.PathLike[str] | None


def tracks_this_rank(framework_rank: int, env: Mapping[str, str] | None = None) -> bool:
    """Does this process log? Under torchrun or srun (a job identity with a world > 1) every rank does: each
    joins flightlog's one run, which ends when every rank ended (``distributed.log_ranks`` decides what the
    backends get). A job no such launcher started (Lightning's or HF's own process launching) has no
    identity that the ranks share: only the framework's rank 0 logs, as the frameworks' own loggers do —
    a tracker on the other ranks would start runs of their own."""
    job = job_identity(env)
    if job.run_id is not None and job.world_size > 1:
        return True
    return framework_rank == 0


def plain(value: Any, depth: int = 0) -> Any:
    """A hyper-parameter value as plain data: numbers, strings, bools, None, lists and str-keyed dicts;
    anything else (a dtype, a class, an enum, a path) as its ``str``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if depth > 16:
        return str(value)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in value]
    item = getattr(value, "item", None)  # a numpy scalar or 0-dim tensor
    if callable(item) and getattr(value, "ndim", None) == 0:
        return plain(item(), depth + 1)
    return str(value)


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that are numbers (a framework's log dict also holds strings)."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, bool) or isinstance(v, (str, bytes)) or v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError, RuntimeError):  # a multi-element tensor, a list
            continue
        out[str(k)] = f
    return out


class LazyRun:
    """One flightlog run that starts on first use. After ``finish`` the next use continues the same run
    (same run id): a framework ends training, then evaluates or tests into the same logger."""

    def __init__(self, name: str, config: ConfigSource, options: Mapping[str, Any]) -> None:
        self.name = name
        self.config = load_config(config)  # resolved once: errors at construction, not mid-training
        self.options = dict(options)
        self.run_id: str | None = self.options.pop("run_id", None)
        self.tracker: ExperimentTracker | None = None

    def get(self) -> ExperimentTracker:
        if self.tracker is None:
            self.tracker = ExperimentTracker(self.name, self.config, run_id=self.run_id, **self.options)
            self.run_id = self.tracker.run_id
        return self.tracker

    def finish(self, status: str = "completed", error: str = "") -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.finish(status, error)
