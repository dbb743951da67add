"""flightlog: log metrics at a microsecond a call, durably, to every tracking backend at once.

Importing this package stays light (no torch, wandb, mlflow or tensorboardX).
"""
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
