"""flightlog.proto.checkpoint: the checkpoint file format, codecs, writer, reader, registry and retention
(shared: the SDK writes and loads files in-process, the agent writes what trainers staged)."""
from .reader import CheckpointReader, verify_file
from .registry import Registry
from .retention import Entry, choose_best, plan_retention
from .writer import commit_checkpoint, recover_interrupted, write_container

__all__ = [
    "CheckpointReader",
    "verify_file",
    "Registry",
    "Entry",
    "choose_best",
    "plan_retention",
    "commit_checkpoint",
    "recover_interrupted",
    "write_container",
]
