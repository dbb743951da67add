"""The web UI's agent page as data: the live agent's status when one answers on the socket, and what the data
directory holds either way (each sink's cursor and the WAL bytes behind it, quarantined runs and events with
their reasons, recent checkpoint writes)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import time
from typing import Any

from flightlog.agent.store import Store
from flightlog.proto.errors import CheckpointError, FlightlogError
from flightlog.proto.paths import AgentPaths

__all__ = ["agent_overview", "wal_segments", "sink_backlogs", "live_status"]

_RECENT_CHECKPOINTS = 50


def live_status(paths: AgentPaths, timeout: float = 2.0) -> dict[str, Any] | None:
    """The running agent's own status (sinks, backlog, alerts, producers), or None if none answers."""
    from flightlog.proto.control import connect
    from flightlog.proto.events import StatusRequest

    try:
        client = connect(paths, timeout=timeout)
    except (OSError, FlightlogError):
        return None
    if client is None:
        return None
    try:
        data: dict[str, Any] = client.request(StatusRequest()).data
        return data
    except (OSError, FlightlogError):
        return None
    finally:
        client.close()


def wal_segments(paths: AgentPaths) -> list[tuple[int, int]]:
    """(first seq, bytes) of each WAL segment, in order ([] without a WAL)."""
    try:
        names = sorted(n for n in os.listdir(paths.wal_dir) if len(n) == 24 and n.endswith(".wal")
                       and n[:20].isdigit())
    except OSError:
        return []
    out = []
    for n in names:
        try:
            out.append((int(n[:20]), os.stat(paths.wal_dir / n).st_size))
        except OSError:  # a segment the agent just released
            continue
    return out


def sink_backlogs(cursors: list[dict[str, Any]], segments: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per sink cursor (segment = the first seq of its segment, offset = bytes into it): the WAL bytes not
    yet delivered (the rest of its segment and every later one)."""
    out = []
    for c in cursors:
        behind = sum(size - c["offset"] if first == c["segment"] else size
                     for first, size in segments if first >= c["segment"])
        out.append({**c, "backlog_bytes": max(0, behind)})
    return out


def _cursors(store: Store) -> list[dict[str, Any]]:
    keys = ("sink", "segment", "offset", "seq", "updated")
    with store.reading() as db:
        return [dict(zip(keys, row)) for row in db.execute(f"SELECT {', '.join(keys)} FROM cursors ORDER BY sink")]


def _checkpoint_writes(paths: AgentPaths) -> list[dict[str, Any]]:
    from flightlog.proto.checkpoint.registry import Registry

    try:
        with Registry(paths.store, readonly=True) as reg:
            rows = reg.entries(None, ("writing", "done", "failed", "interrupted", "deleted"))
    except CheckpointError:
        return []
    keep = ("path", "run_id", "state", "step", "size", "is_best", "saved", "error")
    return [{k: r.get(k) for k in keep} for r in rows[-_RECENT_CHECKPOINTS:][::-1]]


def _offline_status(paths: AgentPaths) -> dict[str, Any] | None:
    """``flightlog status``'s offline report (``flightlog.agent.status_offline``) where that module exists."""
    name = "flightlog.agent.status_offline"
    if importlib.util.find_spec(name) is None:
        return None
    fn = getattr(importlib.import_module(name), "offline_status", None)
    out = fn(paths) if callable(fn) else None
    return out if isinstance(out, dict) else None


def agent_overview(paths: AgentPaths, store: Store) -> dict[str, Any]:
    """Everything the agent page shows; works with or without a running agent."""
    segments = wal_segments(paths)
    return {
        "checked_at": time.time(),
        "live": live_status(paths),
        "data_dir": str(paths.data_dir),
        "wal": {"segments": len(segments), "bytes": sum(s for _, s in segments)},
        "sinks": sink_backlogs(_cursors(store), segments),
        "quarantine": store.quarantine_rows(),
        "checkpoint_writes": _checkpoint_writes(paths),
        "offline_status": _offline_status(paths),
    }
