"""A run's hyper-parameters as the tracker logs them: checked, secrets masked, and folded into the run's
config hash (the config and every value logged: two runs that differ only in a learning rate differ in hash)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from flightlog import capture
from flightlog.proto.config import Config, config_hash
from flightlog.validate import KeyRules, flatten_params

__all__ = ["RunParams"]


class RunParams:
    """The hyper-parameters one tracker logged, and the run's hash over its config and them."""

    def __init__(self, config: Config, rules: KeyRules, config_digest: str) -> None:
        self._config = config
        self._rules = rules
        self._logged: dict[str, Any] = {}  # flattened as MLflow keys them: a later value of a key replaces
        self.hash = config_digest

    def clean(self, params: Any) -> dict[str, Any]:
        """``params`` as the run's event carries them: keys as strings, secrets masked; TypeError/ValueError
        for what no backend could keep (not a dict, not plain data, a key a backend refuses)."""
        if not isinstance(params, Mapping):
            raise TypeError(f"log_hyperparameters expects a dict, got {type(params).__name__}")
        clean = capture.redact({str(k): v for k, v in params.items()})
        try:
            msgspec.msgpack.encode(clean)
        except TypeError as exc:
            raise TypeError(f"hyper-parameters must be plain data (numbers, strings, lists, dicts): {exc}") from exc
        self._rules.params(clean)
        return clean

    def record(self, params: Mapping[str, Any]) -> str:
        """Fold logged ``params`` into the run's hash (of the real values, as the config's hash is); returns it."""
        self._logged.update(flatten_params({str(k): v for k, v in params.items()}))
        self.hash = config_hash(self._config, self._logged)
        return self.hash

