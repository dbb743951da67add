"""``flightlog audit ls`` (entries, by run and time) and ``flightlog audit verify`` (the hash chain and the
seal: exit 1 naming the first bad entry)."""
from __future__ import annotations

import argparse
import datetime
import json
import re
import time
from typing import Any

import msgspec

from flightlog.agent.cliutil import add_location_args, printable, resolve_location
from flightlog.proto.audit import AuditLog
from flightlog.proto.errors import FlightlogError

__all__ = ["add_subparsers", "parse_since"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: an age (``30m``, ``2h``, ``7d``) or an ISO time (``2026-12-01``, ``2026-12-01T10:00``)."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise FlightlogError(f"--since {text!r}: give an age such as 30m, 2h or 7d, or an ISO time such as "
                             "2026-12-01T10:00") from exc
    return when.timestamp()


def add_subparsers(sub: Any) -> None:
    a = sub.add_parser("audit", help="the audit log: who read or deleted what; verify it was not tampered with")
    asub = a.add_subparsers(dest="audit_command", required=True)
    ls = asub.add_parser("ls", help="list audit entries")
    add_location_args(ls)
    ls.add_argument("--run", help="only entries about this run id")
    ls.add_argument("--since", help="only entries since an age (30m, 2h, 7d) or an ISO time")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)
    v = asub.add_parser("verify", help="check the hash chain and the seal; exit 1 naming the first bad entry")
    add_location_args(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_verify)


def _ls(args: argparse.Namespace) -> int:
    paths, _ = resolve_location(args)
    since = parse_since(args.since) if args.since else None
    rows = [e for e in AuditLog(paths.data_dir).entries()
            if (args.run is None or e.run == args.run) and (since is None or e.time >= since)]
    if args.json:
        print(json.dumps(msgspec.to_builtins(rows), indent=2))
        return 0
    for e in rows:
        when = datetime.datetime.fromtimestamp(e.time).isoformat(timespec="seconds")
        line = f"{e.seq:>6} {when} {e.user}({e.uid}) pid {e.pid}@{e.host} {e.action} {e.object} {e.outcome}"
        if e.detail:
            line += f": {e.detail}"
        print(printable(line))
    return 0


def _verify(args: argparse.Namespace) -> int:
    paths, _ = resolve_location(args)
    audit = AuditLog(paths.data_dir)
    verdict = audit.verify()
    if args.json:
        print(json.dumps({"ok": verdict.ok, "entries": verdict.entries, "bad_entry": verdict.bad_entry,
                          "problem": verdict.problem, "log": str(audit.path)}, indent=2))
    elif verdict.ok:
        print(f"audit log {audit.path}: {verdict.entries} entries, chain and seal intact")
    else:
        print(printable(f"audit log {audit.path}: TAMPERED: {verdict.problem}"))
    return 0 if verdict.ok else 1
