"""An in-memory sink for tests of the agent's own logic (delivery, retries, cursors)."""
from __future__ import annotations

from collections.abc import Callable

from flightlog.proto.events import Event

from .base import Ack, Batch, SinkCursor

__all__ = ["InMemorySink"]


class InMemorySink:
    def __init__(self, name: str = "memory", *, batch_size: int = 100, all_runs: bool = True,
                 fail: Callable[[Batch], None] | None = None, quarantine_scope: str = "event") -> None:
        self.name = name
        self.quarantine_scope = quarantine_scope  # what one refused event takes down: "event" or "run"
        self.batch_size = batch_size
        self.all_runs = all_runs
        self.events: list[tuple[int, Event]] = []
        self.writes = 0
        self.fail = fail  # called before each write; may raise a BackendError to simulate an outage
        self.opened = False

    def open(self) -> SinkCursor | None:
        self.opened = True
        return None

    def write(self, batch: Batch) -> Ack:
        if self.fail is not None:
            self.fail(batch)
        self.writes += 1
        self.events.extend(batch.events)
        return Ack(delivered=len(batch.events))

    def close(self) -> None:
        self.opened = False
