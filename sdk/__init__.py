"""flightlog: log metrics at a microsecond a call, durably, to every tracking backend at once.

Importing this package stays light (no torch, wandb, mlflow or tensorboardX), and its public names resolve
on first use: ``import flightlog.agent.daemon`` loads the shared core (``flightlog.proto``), never the tracker.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flightlog.capture import seed_everything
    from flightlog.checkpoint import CheckpointMetadata, ModelCheckpointer, PendingCheckpoint
    from flightlog.proto.config import Config, config_hash, load_config
    from flightlog.proto.errors import (
        AgentUnavailable,
        CheckpointCorrupt,
        CheckpointError,
        ConfigError,
        FlightlogError,
        ProtocolError,
        TrackerFinished,
        WALCorrupt,
        WALError,
    )
    from flightlog.tracker import ExperimentMetadata, ExperimentTracker, experiment_tracking

__version__ = "0.1.0"

#: public name -> the module that defines it (checkpointing needs torch: imported only when used)
_PUBLIC = {
    "ExperimentTracker": "flightlog.tracker",
    "ExperimentMetadata": "flightlog.tracker",
    "experiment_tracking": "flightlog.tracker",
    "ModelCheckpointer": "flightlog.checkpoint",
    "CheckpointMetadata": "flightlog.checkpoint",
    "PendingCheckpoint": "flightlog.checkpoint",
    "seed_everything": "flightlog.capture",
    "Config": "flightlog.proto.config",
    "load_config": "flightlog.proto.config",
    "config_hash": "flightlog.proto.config",
    "FlightlogError": "flightlog.proto.errors",
    "ConfigError": "flightlog.proto.errors",
    "ProtocolError": "flightlog.proto.errors",
    "AgentUnavailable": "flightlog.proto.errors",
    "WALError": "flightlog.proto.errors",
    "WALCorrupt": "flightlog.proto.errors",
    "CheckpointError": "flightlog.proto.errors",
    "CheckpointCorrupt": "flightlog.proto.errors",
    "TrackerFinished": "flightlog.proto.errors",
}

__all__ = [
    "ExperimentTracker", "ExperimentMetadata", "experiment_tracking", "ModelCheckpointer", "CheckpointMetadata",
    "seed_everything", "Config", "load_config", "config_hash", "FlightlogError", "ConfigError", "ProtocolError",
    "AgentUnavailable", "WALError", "WALCorrupt", "CheckpointError", "CheckpointCorrupt", "PendingCheckpoint",
    "TrackerFinished",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'flightlog' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
