"""Lightning under its standalone package name (``import pytorch_lightning``): the same
``FlightlogLogger`` and ``FlightlogCheckpointIO`` as ``flightlog.integrations.lightning``, on that
package's own ``Logger`` and ``CheckpointIO`` (each Trainer checks against its own package's classes)."""
from __future__ import annotations

from typing import Any

from lightning_fabric.plugins import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.loggers import Logger
from pytorch_lightning.loggers.logger import DummyExperiment  # type: ignore[attr-defined]

from flightlog.integrations._lightning_core import CheckpointIOCore, LoggerCore, reset_active

__all__ = ["FlightlogLogger", "FlightlogCheckpointIO", "reset_active"]


class FlightlogLogger(LoggerCore, Logger):
    """See ``flightlog.integrations.lightning.FlightlogLogger``."""

    _dummy = DummyExperiment


class FlightlogCheckpointIO(CheckpointIOCore, CheckpointIO):
    """See ``flightlog.integrations.lightning.FlightlogCheckpointIO``."""

    _torch_io: Any = TorchCheckpointIO
