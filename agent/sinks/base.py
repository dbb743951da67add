"""The interface every backend sink implements, and what the runner hands it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from flightlog.agent.wal.format import WalCursor
from flightlog.proto.events import Event

__all__ = ["Batch", "Ack", "Sink", "SinkCursor"]


#: Where a sink resumes in the WAL: the WAL reader's own cursor (record start, next seq to deliver).
SinkCursor = WalCursor


@dataclass
class Batch:
    """Events in WAL order, each with its seq, and the cursor that follows the last of them."""

    events: list[tuple[int, Event]]
    cursor: SinkCursor
    run_ids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Ack:
    """The backend acknowledged the batch. ``cursor_committed``: the sink stored the cursor itself, in the
    same transaction as the data (exactly-once), so the runner must not store it again. ``refused``: runs of
    the batch the backend refused for good (run id -> reason); the engine quarantines them on this sink, every
    other run of the batch was delivered."""

    delivered: int
    cursor_committed: bool = False
    refused: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@runtime_checkable
class Sink(Protocol):
    #: Unique name; also the key of the sink's cursor.
    name: str
    #: Events per write call (the backend's natural batch size).
    batch_size: int
    #: True when the sink gets every run's events; False when only runs whose RunStart names it.
    all_runs: bool

    # Optional: ``quarantine_scope`` ("event", the default, or "run": what one refused event takes down on this
    # sink) and ``run_start(run_id) -> RunStart | None`` (a run's RunStart from the sink's own registry).

    def open(self) -> SinkCursor | None:
        """Connect; return the cursor the sink stored itself, or None to use the runner's cursor store."""

    def write(self, batch: Batch) -> Ack:
        """Deliver the batch; raise RetryableBackendError or PermanentBackendError on failure."""

    def close(self) -> None: ...
