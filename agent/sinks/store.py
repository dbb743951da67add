"""The local store sink: events into the agent's SQLite database, cursor in the same transaction."""
from __future__ import annotations

from pathlib import Path

from flightlog.agent.store import Store

from .base import Ack, Batch, SinkCursor

__all__ = ["LocalStoreSink"]


class LocalStoreSink:
    name = "store"
    batch_size = 5000
    all_runs = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._store: Store | None = None

    def open(self) -> SinkCursor | None:
        self._store = Store(self.path)
        saved = self._store.load_cursor(self.name)
        return SinkCursor(*saved) if saved else SinkCursor()

    def write(self, batch: Batch) -> Ack:
        store = self._store
        assert store is not None, "open() first"
        with store.transaction():
            store.apply(ev for _, ev in batch.events)
            c = batch.cursor
            store.save_cursor(self.name, c.segment, c.offset, c.seq)
        return Ack(delivered=len(batch.events), cursor_committed=True)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
