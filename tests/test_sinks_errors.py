"""The backends' error tables, the sinks' settings decoded into the config Struct, and `wal replay` into a
local store on the one delivery engine (a bad event quarantined there too)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest_backends import write_wal

from flightlog.agent.replay import make_sink, parse_target, replay
from flightlog.agent.sinks._common import tracking_config
from flightlog.agent.sinks.store import STORE_ERRORS
from flightlog.agent.store import Store
from flightlog.proto.config import TrackingConfig
from flightlog.proto.errors import PermanentBackendError, RetryableBackendError
from flightlog.proto.events import Metrics, RunStart


def test_store_table() -> None:
    assert STORE_ERRORS.verdict(OverflowError("Python int too large to convert to SQLite INTEGER")) == "permanent"
    assert STORE_ERRORS.verdict(sqlite3.OperationalError("database is locked")) == "retryable"
    assert STORE_ERRORS.verdict(OSError(28, "No space left on device")) == "retryable"
    assert STORE_ERRORS.classify(KeyError("bug"), "writing") is None  # unknown: the engine's capped retries


def test_wandb_table_is_not_retry_everything() -> None:
    wandb = pytest.importorskip("wandb")
    from flightlog.agent.sinks.wandb_sink import wandb_errors

    table = wandb_errors(wandb)
    assert isinstance(table.classify(wandb.errors.AuthenticationError("no key"), "init"), PermanentBackendError)
    assert isinstance(table.classify(wandb.errors.CommError("503"), "log"), RetryableBackendError)
    assert isinstance(table.classify(ConnectionResetError(), "log"), RetryableBackendError)
    # The old sink retried these for ever: a value wandb rejects fails the same way every time.
    assert isinstance(table.classify(ValueError("bad key"), "log"), PermanentBackendError)
    assert table.classify(KeyError("bug"), "log") is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mlflow_unknown_errors_are_unknown_not_passed_through() -> None:
    pytest.importorskip("mlflow")
    from flightlog.agent.sinks.mlflow_sink import classify_mlflow_error

    assert classify_mlflow_error(KeyError("bug"), "logging") is None
    assert isinstance(classify_mlflow_error(ValueError("Value out of range: 9223372036854775808"), "logging"),
                      PermanentBackendError)


def test_tracking_settings_come_from_the_config_struct() -> None:
    cfg = tracking_config({"wandb_project": "agent-default"}, {"mlflow_experiment_name": "e", "from_newer_sdk": 1},
                          {"wandb_mode": "offline"})
    assert cfg == TrackingConfig(wandb_project="agent-default", mlflow_experiment_name="e", wandb_mode="offline")
    assert cfg.mlflow_tracking_uri == TrackingConfig().mlflow_tracking_uri  # the one default, not restated
    with pytest.raises(PermanentBackendError, match="wandb_mode"):
        tracking_config({"wandb_mode": "sometimes"})


def test_replay_into_a_store_quarantines_the_bad_event(tmp_path: Path) -> None:
    evs = [RunStart("r", "r", 1.0), *(Metrics("r", s, 1.0, {"m": 1.0}) for s in range(20)),
           Metrics("r", 2**63, 1.0, {"m": 1.0}), *(Metrics("r", s, 1.0, {"m": 1.0}) for s in range(20, 40))]
    write_wal(tmp_path / "wal", evs, per_record=7)
    backend, target = parse_target(f"store={tmp_path / 'out.db'}")
    res = replay(tmp_path / "wal", make_sink(backend, target, tmp_path / "state"), tmp_path / "state",
                 progress=False)
    assert res.events == 41 and res.quarantined == 1 and res.cursor.seq == len(evs)
    store = Store(tmp_path / "out.db", readonly=True)
    assert store.metric_count() == 40
    store.close()
    state = Store(tmp_path / "state" / "state.sqlite", readonly=True)
    [row] = state.quarantine_rows()
    state.close()
    assert (row["run_id"], row["seq"], row["scope"]) == ("r", 21, "event") and "SQLite" in row["reason"]
    # Resumable: a second run finds nothing left to do.
    again = replay(tmp_path / "wal", make_sink(backend, target, tmp_path / "state"), tmp_path / "state",
                   progress=False)
    assert again.events == 0 and again.quarantined == 0
