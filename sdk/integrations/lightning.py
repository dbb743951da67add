"""Lightning (``import lightning``): ``FlightlogLogger`` and ``FlightlogCheckpointIO``.

    trainer = Trainer(logger=FlightlogLogger("my-exp", "config.yaml"), plugins=[FlightlogCheckpointIO()],
                      callbacks=[ModelCheckpoint(save_top_k=2, monitor="val_loss")])

The logger logs metrics, hyper-parameters and ModelCheckpoint's files into one flightlog run (every backend
its config enables); the plugin writes Lightning's checkpoints through flightlog's staging and the agent's
writer (training is blocked only for the copy into shared memory) and reads them back verified. Under
``pytorch_lightning`` use ``flightlog.integrations.pytorch_lightning`` (same classes, that package's bases).
"""
from __future__ import annotations

from typing import Any

try:
    import lightning.fabric.plugins as _plugins
    import lightning.pytorch.loggers as _loggers
except ImportError:  # only the standalone package is installed
    import lightning_fabric.plugins as _plugins  # type: ignore[no-redef]
    import pytorch_lightning.loggers as _loggers  # type: ignore[no-redef]

from flightlog.integrations._lightning_core import CheckpointIOCore, LoggerCore, reset_active

__all__ = ["FlightlogLogger", "FlightlogCheckpointIO", "reset_active"]


class FlightlogLogger(LoggerCore, _loggers.Logger):
    """``FlightlogLogger(name, config=None, *, upload_checkpoints=True, **tracker_options)``: a Lightning
    logger onto one flightlog run. ``tracker_options`` go to ``ExperimentTracker`` (``run_id=`` continues a
    run, ``tags=``, ``description=``). ``experiment`` is the tracker; ``version`` its run id."""

    _dummy = _loggers.logger.DummyExperiment  # type: ignore[attr-defined]


class FlightlogCheckpointIO(CheckpointIOCore, _plugins.CheckpointIO):
    """``FlightlogCheckpointIO(config=None, *, tracker=None, restore_rng=False)``: Lightning's checkpoints
    in flightlog's format, written by the agent of the FlightlogLogger's run (or of ``tracker``; without
    either, by a writer thread of this process with the registry beside the files)."""

    _torch_io: Any = _plugins.TorchCheckpointIO
