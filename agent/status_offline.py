"""``flightlog status`` when no agent runs: what the data directory tells — each sink's cursor, its backlog
in the WAL (events and bytes), the runs it parked and why, its last error and the alerts (from
``health.json``, written by the agent), and the runs with events a sink has not delivered yet."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flightlog.proto.codec import decode_event
from flightlog.proto.errors import FlightlogError, ProtocolError
from flightlog.proto.events import RunStart
from flightlog.proto.paths import AgentPaths

from .health import HEALTH_FILE
from .wal import WALReader
from .wal.format import WalCursor

__all__ = ["MAX_SCAN_EVENTS", "offline_status", "print_offline"]

#: A backlog longer than this is counted no further (the report says "at least").
MAX_SCAN_EVENTS = 5_000_000
_HEALTH_LIMIT = 4 << 20  # health.json is the agent's own small file; anything bigger is not read


def _read_health(path: Path) -> dict[str, Any]:
    try:
        if not path.is_file() or path.stat().st_size > _HEALTH_LIMIT:
            return {}
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_view(paths: AgentPaths) -> tuple[dict[str, WalCursor], dict[str, set[str]], list[dict[str, Any]],
                                            dict[str, str]]:
    """Cursors, each sink's runs, quarantine rows and run names, from the store (read-only)."""
    from .store import Store

    if not paths.store.exists():
        return {}, {}, [], {}
    try:
        store = Store(paths.store, readonly=True)
    except FlightlogError:
        return {}, {}, [], {}
    try:
        names = {r["run_id"]: r["name"] for r in store.runs()}
        rows = store.quarantine_rows()
        sinks = {row[0] for row in store.db.execute("SELECT sink FROM cursors")}
        sinks |= {row[0] for row in store.db.execute("SELECT DISTINCT sink FROM sink_runs")}
        cursors = {}
        for sink in sinks:
            saved = store.load_cursor(sink)
            cursors[sink] = WalCursor(*saved) if saved else WalCursor()
        return cursors, {s: store.sink_runs(s) for s in sinks}, rows, names
    finally:
        store.close()


def _scan(wal_dir: Path, cursors: dict[str, WalCursor], served: dict[str, set[str]]) -> tuple[
        dict[str, int], dict[str, dict[str, int]], bool]:
    """One pass over the WAL from the lowest cursor: per sink the events behind its cursor that it serves, and
    per run the sinks that still owe it events. The store serves every run; a backend sink the runs whose
    RunStart names it."""
    behind = dict.fromkeys(cursors, 0)
    runs: dict[str, dict[str, int]] = {}
    if not cursors or not wal_dir.is_dir():
        return behind, runs, False
    served = {s: set(r) for s, r in served.items()}
    reader = WALReader(wal_dir)
    cursor = min(cursors.values(), key=lambda c: c.seq)
    seen = 0
    try:
        while seen < MAX_SCAN_EVENTS:
            items, cursor = reader.read(cursor, max_events=10_000)
            if not items:
                break
            for seq, payload in items:
                seen += 1
                try:
                    ev = decode_event(payload)
                except ProtocolError:
                    continue
                if type(ev) is RunStart:
                    for sink in ev.sinks:
                        served.setdefault(sink, set()).add(ev.run_id)
                for sink, c in cursors.items():
                    if seq >= c.seq and (sink == "store" or ev.run_id in served.get(sink, ())):
                        behind[sink] += 1
                        owed = runs.setdefault(ev.run_id, {})
                        owed[sink] = owed.get(sink, 0) + 1
    finally:
        reader.close()
    return behind, runs, seen >= MAX_SCAN_EVENTS


def offline_status(paths: AgentPaths) -> dict[str, Any]:
    """The report, as ``flightlog status --json`` prints it next to ``"running": false``."""
    health = _read_health(paths.data_dir / HEALTH_FILE)
    cursors, served, rows, names = _store_view(paths)
    got = health.get("sinks")
    last: dict[str, Any] = got if isinstance(got, dict) else {}
    for sink in last:
        cursors.setdefault(sink, WalCursor())
    behind, owed, cut = _scan(paths.wal_dir, cursors, served)
    reader = WALReader(paths.wal_dir) if paths.wal_dir.is_dir() else None
    sinks: dict[str, Any] = {}
    for sink in sorted(cursors):
        c = cursors[sink]
        got = last.get(sink)
        seen: dict[str, Any] = got if isinstance(got, dict) else {}
        parked = [{"run_id": r["run_id"], "name": names.get(r["run_id"], ""), "scope": r["scope"],
                   "events": r["events"], "reason": r["reason"], "location": r["location"]}
                  for r in rows if r["sink"] == sink]
        sinks[sink] = {
            "cursor": {"segment": c.segment, "offset": c.offset, "seq": c.seq},
            "backlog_events": behind.get(sink, 0),
            "backlog_bytes": reader.backlog(c)[1] if reader is not None else 0,
            "state": str(seen.get("state", "unknown")), "last_error": str(seen.get("last_error") or ""),
            "retrying_since": seen.get("retrying_since"), "parked": parked,
        }
    if reader is not None:
        reader.close()
    wal_bytes = sum(p.stat().st_size for p in paths.wal_dir.glob("*.wal")) if paths.wal_dir.is_dir() else 0
    alerts, pid, seen_at = health.get("alerts"), health.get("pid"), health.get("written_at")
    return {
        "data_dir": str(paths.data_dir), "health_file": str(paths.data_dir / HEALTH_FILE) if health else None,
        "last_agent_pid": pid if isinstance(pid, int) else None,
        "last_seen": seen_at if isinstance(seen_at, (int, float)) and 0 < seen_at < 1e11 else None,
        "wal": {"directory": str(paths.wal_dir), "bytes": wal_bytes},
        "sinks": sinks, "alerts": [a for a in alerts if isinstance(a, str)] if isinstance(alerts, list) else [],
        "undelivered_runs": {run: {"name": names.get(run, ""), "sinks": per} for run, per in sorted(owed.items())},
        "backlog_counted_to": MAX_SCAN_EVENTS if cut else None,
    }


def print_offline(report: dict[str, Any], printable: Any) -> None:
    """The report for a person (names escaped by the CLI's ``printable``)."""
    import datetime

    if report.get("last_seen"):
        when = datetime.datetime.fromtimestamp(report["last_seen"]).isoformat(timespec="seconds")
        print(f"last agent: pid {report['last_agent_pid']}, state written {when} ({report['health_file']})")
    print(f"WAL: {report['wal']['bytes']} bytes in {report['wal']['directory']}")
    more = " (at least: counted no further)" if report.get("backlog_counted_to") else ""
    print("sinks:")
    for name, s in report["sinks"].items():
        c = s["cursor"]
        line = (f"  {name}: cursor seq {c['seq']} (segment {c['segment']}, offset {c['offset']}), backlog "
                f"{s['backlog_events']} events{more} / {s['backlog_bytes']} B, last state {s['state']}")
        if s["last_error"]:
            line += f", last error: {s['last_error']}"
        print(printable(line))
        for p in s["parked"]:
            what = "run" if p["scope"] == "run" else "event(s) of run"
            print(printable(f"    parked {what} {p['run_id']} {p['name']!r}: {p['events']} events kept in "
                            f"{p['location']}: {p['reason']}"))
    for alert in report["alerts"]:
        print(printable(f"ALERT: {alert}"))
    if report["undelivered_runs"]:
        print("runs with undelivered events (an agent started on this data dir delivers them):")
        for run, r in report["undelivered_runs"].items():
            per = ", ".join(f"{sink} {n}" for sink, n in sorted(r["sinks"].items()))
            print(printable(f"  {run} {r['name']!r}: {per}"))
