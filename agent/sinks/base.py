"""The interface every backend sink implements, and what the runner hands it."""
from __future__ import annotations

from dataclasses import dataclass, field
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
    same transaction as the data (exactly-once), so the runner must not store it again."""

    delivered: int
    cursor_committed: bool = False


@runtime_checkable
class Sink(Protocol):
    #: Unique name; also the key of the sink's cursor.
    name: str
    #: Events per write call (the backend's natural batch size).
    batch_size: int
    #: True when the sink gets every run's events; False when only runs whose RunStart names it.
    all_runs: bool

    def open(self) -> SinkCursor | None:
        """Connect; return the cursor the sink stored itself, or None to use the runner's cursor store."""

    def write(self, batch: Batch) -> Ack:
        """Deliver the batch; raise RetryableBackendError or PermanentBackendError on failure."""

    def close(self) -> None: ...
