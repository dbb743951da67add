"""Checkpoints from the training loop: stage the state into shared memory (the only time training is
blocked), then have it written durably by the agent, or by a writer thread here when there is none.

No pickle anywhere: tensors go into the safetensors data, everything else (epoch, step, optimizer
param groups, scheduler and scaler state, RNG states) into JSON in the safetensors ``__metadata__``.
Modules: ``state`` (the codec), ``staging``, ``writers``, ``loading``, ``checkpointer``.
"""
from __future__ import annotations

from flightlog.checkpoint.checkpointer import CheckpointMetadata, ModelCheckpointer, PendingCheckpoint

__all__ = ["ModelCheckpointer", "CheckpointMetadata", "PendingCheckpoint"]
