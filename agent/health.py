"""How the sinks serve each run, as data: the report behind a trainer's "W&B ... parked" line, its finish()
summary and ``tracker.health()`` (asked over the control socket), and ``<data_dir>/health.json``, the
sinks' last state that ``flightlog status`` reads once the agent has exited."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import anyio

from flightlog.proto.errors import FlightlogError
from flightlog.proto.events import Alert, HealthRequest

from .grid import sleep_on_grid
from .run_counts import RunIndex
from .sinks._common import atomic_write_json

if TYPE_CHECKING:
    from .daemon import Agent
    from .runner import SinkRunner

__all__ = ["HEALTH_FILE", "SINK_LABELS", "HealthBoard", "HealthLoop", "replay_target"]

log = logging.getLogger("flightlog.agent")

#: In the data directory: the sinks' state as the agent last saw it (for ``flightlog status`` offline).
HEALTH_FILE = "health.json"
#: How a sink is named to a person.
SINK_LABELS = {"store": "local store", "tensorboard": "TensorBoard", "mlflow": "MLflow", "wandb": "W&B",
               "webhook": "webhook", "node_webhook": "node webhook"}
_TROUBLE = ("retrying", "open circuit")
_CALM = hashlib.sha256(json.dumps([]).encode()).hexdigest()[:16]  # the version of a report with no trouble
_MAX_WAIT = 300.0  # a long poll answers at least this often (a dead trainer's connection is then noticed)


def replay_target(sink: Any, run_id: str, store_path: str) -> str:
    """``BACKEND=TARGET`` for ``flightlog wal replay --to`` that sends a run where its sink would have."""
    name = sink.name
    if name == "store":
        return f"store={store_path}"
    start = getattr(sink, "run_start", lambda _r: None)(run_id)
    tracking = sink.tracking(start) if start is not None and hasattr(sink, "tracking") else None
    if tracking is None:
        return f"{name}=TARGET"
    if name == "wandb":
        return f"wandb={tracking.wandb_mode}"
    if name == "mlflow":
        return f"mlflow={tracking.mlflow_tracking_uri}"
    if name == "tensorboard":
        return f"tensorboard={tracking.tensorboard_log_dir}"
    return f"{name}=TARGET"


class HealthBoard:
    """Reads the runners' state (no thread of its own, nothing on the delivery path): when each sink began
    retrying, and per run what each sink that serves it is doing."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._since: dict[str, float] = {}  # sink -> wall time its current run of retries began
        self._store: Any = None
        self._index: RunIndex | None = None  # which WAL seqs are whose: the run's pending events per sink

    # --- the sinks' trouble, as time goes on -----------------------------------------------------

    def observe(self, now: float | None = None) -> None:
        """Note when each sink started retrying (called by every report and by the health loop)."""
        now = time.time() if now is None else now
        for r in self.agent.runners:
            if r.stats.state in _TROUBLE:
                self._since.setdefault(r.sink.name, now)
            else:
                self._since.pop(r.sink.name, None)

    def retrying_seconds(self, sink: str, now: float | None = None) -> float:
        since = self._since.get(sink)
        return 0.0 if since is None else max(0.0, (time.time() if now is None else now) - since)

    # --- one run ---------------------------------------------------------------------------------

    async def report(self, msg: HealthRequest) -> dict[str, Any]:
        """The run's report: per sink that serves it "delivered", "pending", "retrying" or "parked", with the
        reason, the events kept and the command that replays them; ``version`` changes only with trouble."""
        now = time.time()
        self.observe(now)
        agent = self.agent
        next_seq = agent.wal.next_seq
        upto = next_seq if msg.upto < 0 else msg.upto
        serving = [r for r in agent.runners if _serves(r, msg.run_id)]
        # The store is asked only when some sink quarantined something (never while all is well).
        rows = await anyio.to_thread.run_sync(self._quarantine_rows, msg.run_id) \
            if any(r.stats.quarantined_events for r in serving) else []
        counts, exact_to = await anyio.to_thread.run_sync(self._pending, msg.run_id, serving, upto, next_seq)
        sinks: dict[str, dict[str, Any]] = {}
        for r, pending in zip(serving, counts):
            sinks[r.sink.name] = await self._sink_report(r, msg, rows, pending, now, (upto, next_seq, exact_to))
        trouble = sorted((name, s["status"], s["reason"][:200]) for name, s in sinks.items() if s["alert"])
        version = hashlib.sha256(json.dumps(trouble).encode()).hexdigest()[:16]
        return {"run_id": msg.run_id, "version": version, "sinks": sinks, "next_seq": next_seq,
                "alerts": [*agent.monitor.alerts(), *([agent.ingest.error] if agent.ingest.error else [])]}

    def _pending(self, run_id: str, serving: list[SinkRunner], upto: int, next_seq: int) -> tuple[
            list[tuple[int, int]], int]:
        """Per sink: the run's own events in the WAL past what the sink is done with, up to ``upto`` and up
        to the WAL's end (only a sink that is behind costs a look at the WAL; one that is not owes nothing);
        and the seq up to which the counts are exact (the index reads a bounded stretch per look)."""
        lows = [r.core.done if r.core is not None else r.stats.cursor for r in serving]
        behind = [i for i, c in enumerate(lows) if c.seq < next_seq]
        out = [(0, 0)] * len(serving)
        if not behind:
            return out, next_seq
        if self._index is None:
            wal = getattr(self.agent, "wal", None)
            self._index = RunIndex(str(self.agent.paths.wal_dir), limit=wal.end_position if wal else None)
        got = self._index.pending(run_id, [lows[i] for i in behind], upto, next_seq)
        for i, pair in zip(behind, got):
            out[i] = pair
        return out, self._index.indexed_to

    async def _sink_report(self, r: SinkRunner, msg: HealthRequest, rows: list[dict[str, Any]],
                           pending: tuple[int, int], now: float, span: tuple[int, int, int]) -> dict[str, Any]:
        """``delivered``: the run's events this sink delivered (since the agent started); ``pending``: the
        run's events in the WAL it has not yet delivered, refused or passed (``span``: upto, the WAL's end,
        and the seq the counts are exact to; past it they are lower bounds, ``pending_exact`` False)."""
        upto, next_seq, counted_to = span
        st, core, name = r.stats, r.core, r.sink.name
        mine = [row for row in rows if row["sink"] == name]
        kept = sum(int(row["events"] or 0) for row in mine)
        to_upto, to_end = pending
        out: dict[str, Any] = {"sink": name, "label": SINK_LABELS.get(name, name), "state": st.state,
                               "reason": "", "kept_events": 0, "retrying_seconds": 0.0, "alert": False,
                               "quarantined_events": kept, "replay": "", "parked": False,
                               "quarantine_reason": mine[-1]["reason"] if mine else "",
                               "delivered": st.run_delivered.get(msg.run_id, 0), "pending": to_end,
                               "pending_exact": counted_to >= next_seq}
        done = core.done.seq if core is not None else st.cursor.seq
        if core is not None and msg.run_id in core.quarantined_runs:
            reason = next((row["reason"] for row in reversed(mine) if row["scope"] == "run"), st.last_error)
            target = await anyio.to_thread.run_sync(replay_target, r.sink, msg.run_id, str(self.agent.paths.store))
            out.update(status="parked", reason=reason, kept_events=kept, alert=True, parked=True,
                       replay=f"flightlog wal replay {r.quarantine.directory(name)} --to {target} --run {msg.run_id}")
        elif st.state in _TROUBLE and to_end:
            seconds = self.retrying_seconds(name, now)
            target = await anyio.to_thread.run_sync(replay_target, r.sink, msg.run_id, str(self.agent.paths.store))
            out.update(status="retrying", reason=st.last_error, kept_events=to_end,
                       retrying_seconds=round(seconds, 1), alert=seconds >= msg.after_seconds,
                       replay=f"flightlog wal replay {self.agent.paths.wal_dir} --to {target} --run {msg.run_id}")
        elif to_upto or (counted_to < upto and done < upto):
            out.update(status="pending", kept_events=to_upto)  # not counted that far yet: maybe pending
        else:
            out.update(status="delivered")
        return out

    def all_quarantine_rows(self) -> list[dict[str, Any]]:
        from .store import Store

        try:
            if self._store is None:
                self._store = Store(self.agent.paths.store, readonly=True)
            rows: list[dict[str, Any]] = self._store.quarantine_rows()
        except FlightlogError:  # no store yet: nothing was quarantined
            return []
        return rows

    def _quarantine_rows(self, run_id: str) -> list[dict[str, Any]]:
        return [row for row in self.all_quarantine_rows() if row["run_id"] == run_id]

    async def answer(self, msg: HealthRequest) -> dict[str, Any]:
        """A long poll: the report once its version differs from the caller's (or, ``settle``: once no sink of
        the run is pending), at the latest after ``msg.wait`` seconds; it looks once a second meanwhile."""
        deadline = anyio.current_time() + min(max(msg.wait, 0.0), _MAX_WAIT)
        while True:
            left = deadline - anyio.current_time()
            if not msg.settle and left > 0 and msg.version == _CALM and self._calm(msg.run_id):
                # Nothing can have changed the version (no sink of the run in trouble): look again in a
                # second without building the report (each tracker's poll would otherwise cost thread hops
                # and WAL reads every second).
                await sleep_on_grid(1.0, deadline)
                continue
            report = await self.report(msg)
            left = deadline - anyio.current_time()
            if left <= 0:
                return report
            if msg.settle:
                if all(s["status"] != "pending" for s in report["sinks"].values()):
                    return report
                await anyio.sleep(min(0.05, left))  # finish() waits on it: the sinks deliver within a linger (300 ms)
            elif report["version"] != msg.version:
                return report
            else:
                await sleep_on_grid(1.0, deadline)

    def _calm(self, run_id: str) -> bool:
        """No sink that serves the run retries, has quarantined anything or parked it: its version is _CALM."""
        self.observe()
        for r in self.agent.runners:
            if not _serves(r, run_id):
                continue
            st = r.stats
            if st.state in _TROUBLE or st.quarantined_events or (r.core is not None and run_id in r.core.quarantined_runs):
                return False
        return True

    # --- every sink, for the data directory ------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The sinks' state as ``flightlog status`` shows it when no agent runs."""
        self.observe()
        sinks = {}
        for r in self.agent.runners:
            st = r.stats
            since = self._since.get(r.sink.name)
            sinks[r.sink.name] = {"state": st.state, "last_error": st.last_error, "retries": st.retries,
                                  "retrying_since": since, "delivered": st.delivered,
                                  "quarantined_runs": sorted(r.core.quarantined_runs) if r.core is not None else []}
        agent = self.agent
        return {"pid": os.getpid(), "sinks": sinks,
                "alerts": [*agent.monitor.alerts(), *([agent.ingest.error] if agent.ingest.error else [])]}

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._index is not None:
            self._index.close()
            self._index = None


def _serves(r: SinkRunner, run_id: str) -> bool:
    core = r.core
    if core is None:
        return False
    return core.all_runs or run_id in core.runs or run_id in core.quarantined_runs


class HealthLoop:
    """Writes ``health.json`` when the sinks' state changed (looked at every ``period`` seconds, and once at
    the agent's stop), so ``flightlog status`` can tell the last error after the agent has gone."""

    def __init__(self, board: HealthBoard, period: float = 5.0) -> None:
        self.board = board
        self.period = period
        self._written: str = ""
        self._parked: set[tuple[str, str]] = set()  # (sink, run) already announced (or parked before this start)

    def _known_parked(self) -> set[tuple[str, str]]:
        rows = self.board.all_quarantine_rows()
        return {(r["sink"], r["run_id"]) for r in rows if r["scope"] == "run"}

    def _new_parked(self) -> list[tuple[SinkRunner, str]]:
        out = []
        for r in self.board.agent.runners:
            for run_id in list(r.core.quarantined_runs) if r.core is not None else ():
                if (r.sink.name, run_id) not in self._parked:
                    self._parked.add((r.sink.name, run_id))
                    out.append((r, run_id))
        return out

    def announce_parked(self, new: list[tuple[SinkRunner, str]]) -> None:
        """A sink parked a run: an Alert event of the run into the WAL (the store keeps it; the webhook sink
        posts it, with retries like any delivery)."""
        for r, run_id in new:
            rows = [row for row in self.board.all_quarantine_rows()
                    if row["sink"] == r.sink.name and row["run_id"] == run_id and row["scope"] == "run"]
            reason = rows[-1]["reason"] if rows else r.stats.last_error
            label = SINK_LABELS.get(r.sink.name, r.sink.name)
            self.board.agent.emit(Alert(run_id, "error", f"{label} parked the run: {reason}; its events are kept in "
                                        f"{r.quarantine.directory(r.sink.name)} (see `flightlog status`)",
                                        time.time(), key=f"sink_parked/{r.sink.name}"))

    def changed(self) -> tuple[str, dict[str, Any]] | None:
        """The snapshot and its key when it differs from what was written last (cheap: no I/O)."""
        snap = self.board.snapshot()
        # Counts that move with every batch are not a change worth a write; state, errors and alerts are.
        key = json.dumps({"alerts": snap["alerts"],
                          "sinks": {n: {k: v for k, v in s.items() if k != "delivered"}
                                    for n, s in snap["sinks"].items()}}, sort_keys=True)
        return None if key == self._written else (key, snap)

    def write(self, key: str, snap: dict[str, Any]) -> None:
        snap["written_at"] = time.time()
        try:
            atomic_write_json(self.board.agent.paths.data_dir / HEALTH_FILE, snap)
        except OSError as exc:  # a full disk: the live status still has it
            log.warning("cannot write %s: %s", HEALTH_FILE, exc)
            return
        self._written = key

    async def run(self) -> None:
        self._parked = await anyio.to_thread.run_sync(self._known_parked)
        try:
            while True:
                await sleep_on_grid(self.period)
                new = self._new_parked()
                if new:
                    await anyio.to_thread.run_sync(self.announce_parked, new)
                change = self.changed()
                if change is not None:
                    await anyio.to_thread.run_sync(self.write, *change)
        finally:
            with anyio.CancelScope(shield=True):
                change = self.changed()
                if change is not None:
                    await anyio.to_thread.run_sync(self.write, *change)
