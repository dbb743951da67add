"""What the person training hears about delivery: a watcher thread (rank 0) that long-polls the agent's
health report on a control connection of its own and prints one line to stderr when a sink of the run is
parked or has retried for ``notify.after_seconds``; the finish() summary; ``tracker.health()``'s data."""
from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from flightlog.link import AgentLink
from flightlog.proto.control import AgentClient, connect
from flightlog.proto.errors import FlightlogError
from flightlog.proto.events import HealthRequest
from flightlog.proto.paths import AgentPaths

__all__ = ["HealthWatcher", "ask_health", "describe", "summary_lines"]

#: One sink says the same thing at most this often (a flapping backend is not a flood on the terminal).
REPEAT_SECONDS = 300.0
_POLL_SECONDS = 60.0  # the agent answers a long poll at a change, or after this long
_RETRY_CONNECT = 5.0


def describe(s: dict[str, Any]) -> str:
    """One sink's line, e.g. "MLflow: 401 Unauthorized — parked; 12,345 events kept; fix and run `...`"."""
    label = s.get("label") or s.get("sink", "?")
    status = s.get("status", "?")
    if status == "parked":
        return (f"{label}: {s['reason']} — parked; {s['kept_events']:,} events kept in the WAL; fix and run "
                f"`{s['replay']}`")
    if status == "retrying":
        return (f"{label}: {s['reason']} — retrying for {s['retrying_seconds']:.0f} s; {s['kept_events']:,} "
                f"events kept in the WAL, delivered once it answers (or `{s['replay']}`)")
    if status == "pending":
        return f"{label}: pending ({s['kept_events']:,} events to go; the agent keeps delivering)"
    if status == "delivered" and "delivered" in s:
        return f"{label}: delivered ({s['delivered']:,} events)"
    return f"{label}: {status}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """finish()'s lines: each sink's state and, from an agent that counts them, the run's own events it
    delivered, still owes (pending) and parked."""
    out = []
    for s in report.get("sinks", {}).values():
        line = describe(s)
        if "delivered" in s and s.get("status") != "delivered":
            line += f" [{s['delivered']:,} delivered, {s.get('pending', 0):,} pending" + \
                (f", {s.get('quarantined_events', 0):,} parked]" if s.get("parked") else "]")
        out.append(line)
    return out


def ask_health(link: AgentLink, run_id: str, *, after_seconds: float, settle: bool = False,
               wait: float = 0.0) -> dict[str, Any]:
    """The agent's report for the run now (``settle``: once no sink is still delivering, within ``wait``)."""
    if not link.connected:
        return {"run_id": run_id, "connected": False, "sinks": {}}
    reply = link.request(HealthRequest(run_id, wait=wait, after_seconds=after_seconds, settle=settle),
                         timeout=wait + 30.0, reconnect=False)
    if not reply.ok:
        raise FlightlogError(f"the agent could not report run {run_id}'s health: {reply.error}")
    return {**reply.data, "connected": True}


class HealthWatcher:
    """A daemon thread blocked in a long poll (no wake-up while all is well: the agent answers at a change);
    never on the logging path. Prints each sink's trouble once (again after ``REPEAT_SECONDS``)."""

    def __init__(self, paths: AgentPaths, run_id: str, after_seconds: float, stream: IO[str] | None = None) -> None:
        self.paths = paths
        self.run_id = run_id
        self.after_seconds = after_seconds
        self.stream = stream
        self.latest: dict[str, Any] | None = None
        self._said: dict[str, tuple[str, float]] = {}  # sink -> (what was said, when)
        self._stop = threading.Event()
        self._client: AgentClient | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="flightlog-health", daemon=True)

    def start(self) -> HealthWatcher:
        self._thread.start()
        return self

    def _loop(self) -> None:
        version = ""
        while not self._stop.is_set():
            client = self._client or self._connect()
            if client is None:
                self._stop.wait(_RETRY_CONNECT)
                continue
            try:
                reply = client.request(HealthRequest(self.run_id, version=version, wait=_POLL_SECONDS,
                                                     after_seconds=self.after_seconds), timeout=_POLL_SECONDS + 30)
            except FlightlogError:  # the agent went away (or we are stopping): try again later
                self._drop()
                self._stop.wait(_RETRY_CONNECT)
                continue
            if not reply.ok:  # an agent older than this SDK: it has no health report
                self._drop()
                return
            self.latest = reply.data
            version = str(reply.data.get("version", ""))
            self.announce(reply.data)

    def announce(self, report: dict[str, Any], now: float | None = None) -> list[str]:
        """Print what is new in the report's trouble; returns the lines printed."""
        now = time.monotonic() if now is None else now
        lines = []
        for name, s in report.get("sinks", {}).items():
            if not s.get("alert"):
                self._said.pop(name, None)
                continue
            what = f"{s['status']}:{s['reason']}"
            said = self._said.get(name)
            if said is not None and said[0] == what and now - said[1] < REPEAT_SECONDS:
                continue
            self._said[name] = (what, now)
            lines.append(f"flightlog: {describe(s)}")
        if lines and not self._stop.is_set():
            stream = self.stream or sys.stderr
            stream.write("".join(line + "\n" for line in lines))
            stream.flush()
        return lines

    def _connect(self) -> AgentClient | None:
        try:
            client = connect(self.paths, timeout=5.0)
        except FlightlogError:
            return None
        with self._lock:
            if self._stop.is_set():
                if client is not None:
                    client.close()
                return None
            self._client = client
        return client

    def _drop(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._client is not None:
                self._client.shutdown()  # its long poll returns at once
        self._thread.join(timeout=5.0)
        self._drop()


def finish_summary(link: AgentLink, run_id: str, name: str, *, after_seconds: float, wait: float,
                   stream: IO[str] | None = None) -> dict[str, Any] | None:
    """At finish(): the run's report once the sinks settled (at most ``wait`` s), printed one line per sink."""
    try:
        report = ask_health(link, run_id, after_seconds=after_seconds, settle=True, wait=wait)
    except FlightlogError:  # an agent without health reports, or one that went away: finish goes on
        return None
    lines = summary_lines(report)
    if lines:
        out = stream or sys.stderr
        out.write(f"flightlog: delivery of run {name!r} ({run_id}):\n" + "".join(f"  {ln}\n" for ln in lines))
        out.flush()
    return report
