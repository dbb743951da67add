"""SQLite plumbing shared by the agent's store and the checkpoint registry: how a connection is opened
(pragmas, busy timeout) and the one transaction helper (BEGIN IMMEDIATE … COMMIT, guarded ROLLBACK)."""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["BUSY_TIMEOUT_SECONDS", "Connection", "connect", "transaction"]

log = logging.getLogger("flightlog.sqlite")

#: How long a statement waits for another connection's write lock before it fails with "database is locked".
#: Writers hold it for one batch (milliseconds); 30 s rides out a slow disk without hiding a stuck process.
BUSY_TIMEOUT_SECONDS = 30.0


class Connection(sqlite3.Connection):
    """sqlite3's connection, plus a mark for a transaction that a failed ROLLBACK left open."""

    stale_transaction = False


def connect(path: str | os.PathLike[str], *, readonly: bool = False,
            timeout: float = BUSY_TIMEOUT_SECONDS) -> Connection:
    """Open ``path`` the way every flightlog database is opened.

    Autocommit mode (``isolation_level=None``): a transaction is only what ``transaction`` opens, never
    one the sqlite3 module starts on its own. ``check_same_thread=False`` because the agent calls its
    connections from anyio worker threads; the owner must make sure two threads never use one at once.
    A writer sets WAL journalling (readers do not block the writer) and ``synchronous=NORMAL`` (durable at
    every checkpoint of the WAL, and never corrupt: what the agent's own WAL already guarantees for events).
    A read-only connection opens ``path`` with ``mode=ro``: it never creates the file or its schema.
    Raises sqlite3.Error; callers translate it into their own error, naming the file.
    """
    if readonly:
        uri = Path(path).absolute().as_uri() + "?mode=ro"  # as_uri quotes '?', '#' and '%' in the path
        return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False,
                               factory=Connection)
    if str(path) != ":memory:":
        try:  # sqlite would create it 0644; its -wal and -shm files take the database file's mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError:
            pass  # there already, or not creatable: sqlite says which
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False, factory=Connection)
    try:
        _set_wal_mode(db, timeout)
        db.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        db.close()
        raise
    return db


def _set_wal_mode(db: sqlite3.Connection, timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the file: switching a new
    database's journal mode can fail with "database is locked" without waiting on the busy timeout (two
    agent threads opening a fresh store at the same moment did)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; on any error, the body's or COMMIT's own, a ``ROLLBACK``.

    IMMEDIATE takes the write lock up front, so a transaction never fails half-way with SQLITE_BUSY when
    it first writes. The ROLLBACK is guarded: on a full disk or an I/O error it may fail too, and then the
    original error is still the one raised (the rollback's is added to it as a note, and logged). The
    transaction such a failed rollback leaves open on a long-lived connection is rolled back at the next
    call, so the connection is not stuck with "cannot start a transaction within a transaction".
    Transactions do not nest: calling this inside one on the same connection raises RuntimeError.
    """
    if db.in_transaction:
        if not getattr(db, "stale_transaction", False):
            raise RuntimeError("a transaction is already open on this SQLite connection; transactions do not nest")
        db.execute("ROLLBACK")  # may fail again (the disk is still full): raised, the caller tries later
    _mark_stale(db, False)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")  # a failed COMMIT (a deferred constraint, SQLITE_FULL) leaves it open: rolled back
    except BaseException as exc:
        _rollback(db, exc)
        raise


def _rollback(db: sqlite3.Connection, cause: BaseException) -> None:
    if not db.in_transaction:
        return  # SQLite already rolled it back itself (it does on some I/O and full-disk errors)
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        _mark_stale(db, True)
        log.warning("ROLLBACK failed after %s: %s (it is tried again before the next transaction)",
                    type(cause).__name__, exc)
        add_note = getattr(cause, "add_note", None)  # Python 3.11+; on 3.10 the log line is all there is
        if add_note is not None:
            add_note(f"and the ROLLBACK that followed failed too: {type(exc).__name__}: {exc}")


def _mark_stale(db: sqlite3.Connection, stale: bool) -> None:
    if isinstance(db, Connection):  # a plain sqlite3 connection has no room for the mark
        db.stale_transaction = stale
