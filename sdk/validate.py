"""What the SDK accepts from the user, checked in one place: run ids and other strings that reach a path,
metric values, steps, and the keys a run's backends can take. Errors name the key and the rule."""
from __future__ import annotations

import operator
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

from flightlog.proto.names import RUN_ID_MAX, check_file_name, check_run_id

__all__ = [
    "RUN_ID_MAX",
    "INT64_MIN",
    "INT64_MAX",
    "MLFLOW_KEY_MAX",
    "check_run_id",
    "check_experiment_name",
    "check_file_name",
    "check_step",
    "coerce_metrics",
    "mlflow_key_problem",
    "KeyRules",
    "flatten_params",
]

#: SQLite integers and MLflow's steps are signed 64-bit.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: MLflow's rule for metric, param and tag keys (mlflow/utils/validation.py, 3.x on POSIX:
#: ``validate_param_and_metric_name``, ``path_not_unique`` and ``MAX_ENTITY_KEY_LENGTH``).
MLFLOW_KEY_MAX = 250
_MLFLOW_KEY = re.compile(r"^[/\w.\- :]*$")
_MLFLOW_RULE = ("MLflow allows only alphanumerics, underscores (_), dashes (-), periods (.), spaces, colons (:) "
                f"and slashes (/), at most {MLFLOW_KEY_MAX} characters, and no key that a path would normalise "
                "to another (no leading '/', no '..', no '//', no trailing '/')")


def check_experiment_name(name: Any) -> str:
    """A non-empty str (it reaches paths only encoded: ``flightlog.proto.names.safe_component``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"experiment name must be a non-empty string, got {name!r:.60}")
    return name


def check_step(step: Any, what: str = "step") -> int:
    """An int step (numpy integers and 0-dim integer tensors too) inside the signed 64-bit range."""
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(step).__name__}: {step!r:.40}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{what} {value} is outside the signed 64-bit range [-2**63, 2**63 - 1] that the store "
                         "and MLflow can hold")
    return int(value)


def coerce_metrics(metrics: Any) -> dict[str, float | int]:
    """Slow path of log_metrics: a clear TypeError, or numbers converted (bool, numpy, 0-dim tensors, and
    ints beyond 64 bits, which go as floats)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"log_metrics expects a dict of name -> number, got {type(metrics).__name__}")
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if type(key) is not str:
            raise TypeError(f"metric names must be str, got {key!r} ({type(key).__name__})")
        if type(value) is float:
            out[key] = value
            continue
        if type(value) is int:
            out[key] = value if INT64_MIN <= value <= INT64_MAX else float(value)
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(
                f"metric {key!r} must be a number, got {type(value).__name__}: {value!r:.80}; "
                "log text with log_text()"
            )
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # e.g. a tensor of two elements
            raise TypeError(f"metric {key!r} cannot be converted to a number: {exc}") from exc
    return out


def mlflow_key_problem(key: str) -> str:
    """Why MLflow would refuse ``key`` as a metric, param or tag key; '' when it takes it."""
    if len(key) > MLFLOW_KEY_MAX:
        return f"it has {len(key)} characters"
    if not _MLFLOW_KEY.match(key):
        bad = sorted({c for c in key if not _MLFLOW_KEY.match(c)})
        return "it contains " + ", ".join(repr(c) for c in bad)
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        return f"as a path it would read {norm!r}"
    return ""


class KeyRules:
    """The key rules of the backends a run sends to (today MLflow's: the only one with a key rule the SDK
    can check). ``known`` holds the metric keys already checked, so the hot path checks each key once."""

    #: Past this many distinct keys, new keys are still checked but no longer remembered.
    KNOWN_LIMIT = 100_000

    def __init__(self, *, mlflow: bool) -> None:
        self.mlflow = mlflow
        self.known: set[str] = set()

    def check(self, keys: Iterable[str], what: str) -> None:
        keys = list(keys)
        if "" in keys:  # every backend files points under their key: an empty one names nothing
            raise ValueError(f"{what} '' is empty; give it a name")
        if not self.mlflow:
            return
        for key in keys:
            problem = mlflow_key_problem(key)
            if problem:
                raise ValueError(f"{what} {key!r} cannot go to MLflow (enabled for this run): {problem}. "
                                 f"{_MLFLOW_RULE}; rename it")

    def metrics(self, values: Mapping[str, Any]) -> None:
        """Check metric keys not seen before (raises ValueError) and remember them."""
        new = [k for k in values if k not in self.known]
        if new:
            self.check(new, "metric key")
            if len(self.known) < self.KNOWN_LIMIT:
                self.known.update(new)

    def params(self, params: Mapping[str, Any]) -> None:
        """Hyper-parameter keys as the MLflow sink sends them: nested dicts flattened with '.'."""
        self.check(_flat_keys(params), "hyper-parameter key")


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested hyper-parameters as the MLflow sink keys them: ``{"opt": {"lr": 1}}`` -> ``{"opt.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key))
        else:
            out[key] = v
    return out


def _flat_keys(d: Mapping[str, Any]) -> list[str]:
    return list(flatten_params(d))
