"""Checkpoints from the training loop: stage the state into shared memory (the only time training is
blocked), then have it written durably by the agent, or by a writer thread here when there is none.

No pickle anywhere: tensors go into the safetensors data, everything else (epoch, step, optimizer
param groups, scheduler and scaler state, RNG states) into JSON in the safetensors ``__metadata__``.
Modules: ``state`` (the codec), ``staging``, ``writers``, ``loading``, ``checkpointer``, ``dcp`` (DCP storage).
"""
from __future__ import annotations

from typing import Any

from flightlog.checkpoint.checkpointer import CheckpointMetadata, ModelCheckpointer, PendingCheckpoint
from flightlog.proto.checkpoint.keys import Key, KeyRing, load_keyring

__all__ = ["ModelCheckpointer", "CheckpointMetadata", "PendingCheckpoint", "StorageWriter", "StorageReader",
           "Key", "KeyRing", "load_keyring"]


def __getattr__(name: str) -> Any:
    # torch.distributed.checkpoint is imported only by those who use DCP storage
    if name in ("StorageWriter", "StorageReader"):
        from flightlog.checkpoint import dcp

        return getattr(dcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
