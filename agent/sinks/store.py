"""The local store sink: events into the agent's SQLite database, cursor in the same transaction."""
from __future__ import annotations

import sqlite3
from operator import itemgetter
from pathlib import Path

from flightlog.agent.store import Store

from ._errors import ErrorTable, Rule
from .base import Ack, Batch, SinkCursor

__all__ = ["STORE_ERRORS", "LocalStoreSink"]

_EVENT = itemgetter(1)  # of a batch's (seq, event)

#: The local store's error table: a value SQLite cannot hold (an int past 2**63-1, a blob too big, a type it
#: cannot bind) is permanent, for that event; a busy, full or failing disk is retryable.
STORE_ERRORS = ErrorTable("the local store", [
    Rule((OverflowError, TypeError, ValueError, sqlite3.IntegrityError, sqlite3.InterfaceError,
          sqlite3.DataError, sqlite3.ProgrammingError), "permanent"),
    Rule((sqlite3.OperationalError, sqlite3.DatabaseError, OSError), "retryable"),
])


class LocalStoreSink:
    name = "store"
    batch_size = 5000
    all_runs = True
    #: One bad event is quarantined on its own: the rest of its run is still worth having in `runs ls`.
    quarantine_scope = "event"

    def __init__(self, path: str | Path, *, name: str = "store") -> None:
        self.path = Path(path)
        self.name = name  # also the cursor's key: a replay into a live agent's store uses its own
        self._store: Store | None = None

    def open(self) -> SinkCursor | None:
        self._store = Store(self.path)
        saved = self._store.load_cursor(self.name)
        return SinkCursor(*saved) if saved else SinkCursor()

    def write(self, batch: Batch) -> Ack:
        store = self._store
        assert store is not None, "open() first"
        try:
            with store.transaction():
                store.apply(list(map(_EVENT, batch.events)))  # map: no Python frame per event
                c = batch.cursor
                store.save_cursor(self.name, c.segment, c.offset, c.seq)
        except Exception as exc:  # classified by the table; an unknown one goes to the engine as it is
            err = STORE_ERRORS.classify(exc, f"writing {len(batch.events)} events to {self.path}")
            if err is None:
                raise
            raise err from exc
        return Ack(delivered=len(batch.events), cursor_committed=True)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
