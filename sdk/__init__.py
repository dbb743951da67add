"""flightlog: log metrics at a microsecond a call, durably, to every tracking backend at once.

Importing this package stays light (no torch, wandb, mlflow or tensorboardX).
"""
from typing import Any

from flightlog.capture import seed_everything
from flightlog.config import Config, config_hash, load_config
from flightlog.proto.errors import (
    AgentUnavailable,
    CheckpointCorrupt,
    CheckpointError,
    ConfigError,
    FlightlogError,
    ProtocolError,
    WALCorrupt,
    WALError,
)
from flightlog.tracker import ExperimentMetadata, ExperimentTracker, experiment_tracking

__version__ = "0.1.0"

__all__ = [
    "ExperimentTracker",
    "ModelCheckpointer",
    "CheckpointMetadata",
    "seed_everything",
    "ExperimentMetadata",
    "experiment_tracking",
    "Config",
    "load_config",
    "config_hash",
    "FlightlogError",
    "ConfigError",
    "ProtocolError",
    "AgentUnavailable",
    "WALError",
    "WALCorrupt",
    "CheckpointError",
    "CheckpointCorrupt",
]


_LAZY = {"ModelCheckpointer", "CheckpointMetadata", "PendingCheckpoint"}


def __getattr__(name: str) -> Any:
    # Checkpointing needs torch: imported on first use, so `import flightlog` stays light.
    if name in _LAZY:
        from flightlog import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'flightlog' has no attribute {name!r}")
