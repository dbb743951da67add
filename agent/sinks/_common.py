"""What the three backend sinks share: the per-run registry (each run's RunStart and the sink's own state,
one small JSON file per run, written atomically) and the per-run dispatch of a batch.

A sink's cursor may be past a run's RunStart when the agent restarts, so the RunStart (the run's name and
tracking settings) is kept here, not only in memory.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from flightlog.agent.store import RankEnd, combine_rank_ends
from flightlog.proto.config import TrackingConfig
from flightlog.proto.errors import PermanentBackendError
from flightlog.proto.events import Event, Image, Metrics, RunEnd, RunStart
from flightlog.proto.names import safe_component
from flightlog.proto.osutil import make_dirs, restrict_umask

from .base import Ack, Batch, SinkCursor

__all__ = ["RunRegistry", "RunSinkBase", "RankView", "atomic_write_json", "group_by_run", "flatten", "safe_name",
           "tracking_config"]

log = logging.getLogger("flightlog.agent.sinks")


def atomic_write_json(path: Path, data: Any, *, fsync: bool = True) -> None:
    """temp file + fsync + rename: a reader sees the old or the new content, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, payload)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s is not valid JSON (torn write?); ignoring it", path)
        return None


def group_by_run(events: Iterable[tuple[int, Event]]) -> dict[str, list[tuple[int, Event]]]:
    """Events of each run, in WAL order (runs are independent of each other in every backend)."""
    out: dict[str, list[tuple[int, Event]]] = {}
    for seq, ev in events:
        lst = out.get(ev.run_id)
        if lst is None:
            out[ev.run_id] = lst = []
        lst.append((seq, ev))
    return out


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts to dotted keys (``{"opt": {"lr": 1}}`` -> ``{"opt.lr": 1}``); other values as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def image_bytes(ev: Image) -> bytes | None:
    """The PNG of an Image event: its bytes, or the file it names if that still exists."""
    if ev.data:
        return bytes(ev.data)
    try:
        return Path(ev.path).read_bytes() if ev.path else None
    except OSError:
        log.warning("image %s (%s) is gone; not delivered", ev.key, ev.path)
        return None


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; (0, 0) when it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def safe_name(text: str, limit: int = 100) -> str:
    """A file-name-safe form of a run name (``flightlog.proto.names.safe_component``)."""
    return safe_component(text, limit)


_TRACKING_KEYS = frozenset(f.name for f in msgspec.structs.fields(TrackingConfig))


def tracking_config(*layers: Mapping[str, Any] | None) -> TrackingConfig:
    """The run's ``tracking`` settings as the config Struct (one place for every default): later layers win;
    keys this agent does not know (a newer SDK's) are ignored. A bad value raises PermanentBackendError."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update((k, v) for k, v in layer.items() if k in _TRACKING_KEYS)
    try:
        return msgspec.convert(merged, TrackingConfig)
    except msgspec.ValidationError as exc:
        raise PermanentBackendError(f"the run's tracking config is invalid: {exc} (fix the run's config "
                                    "and replay this sink's quarantine)") from exc


class RunRegistry:
    """``<dir>/<run_id>.json``: ``{"start": RunStart as builtins, "state": {...}}``, one per run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, dict[str, Any]] = {}

    def ensure(self) -> None:
        make_dirs(self.directory)

    def _path(self, run_id: str) -> Path:
        return self.directory / f"{safe_name(run_id, 200)}.json"

    def get(self, run_id: str) -> dict[str, Any] | None:
        entry = self._cache.get(run_id)
        if entry is None:
            entry = read_json(self._path(run_id))
            if entry is not None:
                self._cache[run_id] = entry
        return entry

    def put(self, run_id: str, entry: dict[str, Any]) -> None:
        self.ensure()
        atomic_write_json(self._path(run_id), entry)
        self._cache[run_id] = entry

    def start_of(self, run_id: str) -> RunStart | None:
        entry = self.get(run_id)
        if entry is None or "start" not in entry:
            return None
        return msgspec.convert(entry["start"], RunStart)

    def forget(self, run_id: str) -> None:
        self._cache.pop(run_id, None)


class RankView:
    """What a backend sees of a distributed run (RunStart.world_size > 1): rank 0's RunStart; metric points of
    rank 0 (``distributed.log_ranks: zero``) or of every rank under ``rank<k>/<key>`` (``all``); and one RunEnd,
    the ranks' ends combined once every rank ended. Its state (world size, the ranks' ends) is kept in the
    run's registry entry, so a restarted agent still ends the run."""

    def __init__(self, registry: RunRegistry) -> None:
        self.registry = registry

    def filter(self, run_id: str, events: list[tuple[int, Event]]) -> tuple[list[tuple[int, Event]], dict[str, Any] | None]:
        """The events the backend gets, and the run's new rank state (None: unchanged), to ``save`` once the
        backend took them (a batch sent again then ends the run again)."""
        entry = self.registry.get(run_id) or {}
        ranks: dict[str, Any] = dict(entry.get("ranks") or {})
        before = dict(ranks)
        out: list[tuple[int, Event]] = []
        for seq, ev in events:
            kept = self._one(run_id, ranks, ev)
            if kept is not None:
                out.append((seq, kept))
        return out, (ranks if ranks != before else None)

    def save(self, run_id: str, ranks: dict[str, Any] | None) -> None:
        if ranks is not None:
            self.registry.put(run_id, {**(self.registry.get(run_id) or {"state": {}}), "ranks": ranks})

    @staticmethod
    def _one(run_id: str, ranks: dict[str, Any], ev: Event) -> Event | None:
        if type(ev) is RunStart:
            if ev.world_size > 1:
                tracking = ev.config.get("distributed") if isinstance(ev.config, dict) else None
                log_ranks = tracking.get("log_ranks") if isinstance(tracking, dict) else None
                # Rank 0's setting wins; another rank's stands until it comes (a node without rank 0: for good).
                mine = log_ranks or "zero"
                ranks.update(world=max(int(ranks.get("world", 0)), ev.world_size),
                             log_ranks=(ranks.get("log_ranks") or mine) if ev.rank else mine)
                if ev.nodes > 1:  # this agent sees only its node's ranks: it ends the node, not the run
                    ranks.update(nodes=ev.nodes, node_rank=ev.node_rank,
                                 local=ev.local_world_size or max(1, ev.world_size // ev.nodes))
            return ev if ev.rank == 0 else None  # the other ranks join rank 0's run
        world = int(ranks.get("world", 0))
        if world <= 1:
            return ev
        if type(ev) is Metrics:
            if ranks.get("log_ranks") == "all":
                return Metrics(ev.run_id, ev.step, ev.timestamp,
                               {f"rank{ev.rank}/{k}": v for k, v in ev.values.items()}, ev.rank)
            return ev if ev.rank == 0 else None
        if type(ev) is RunEnd:
            ends: dict[str, list[Any]] = dict(ranks.get("ends") or {})
            ends.setdefault(str(ev.rank), [ev.status, ev.error, ev.timestamp, ev.dropped])  # its first end counts
            ranks["ends"] = ends
            if ranks.get("done"):
                return None
            # A job over nodes: this node's end once its ranks ended (the MLflow sink combines the nodes').
            world = int(ranks.get("local", world)) if int(ranks.get("nodes", 1)) > 1 else world
            final = combine_rank_ends(run_id, world, {int(r): RankEnd(*e) for r, e in ends.items()})
            if final is not None:
                ranks["done"] = True
            return final
        return ev


class RunSinkBase:
    """A sink that serves the runs whose RunStart names it, each with its own backend run and settings.

    Subclasses implement ``_write_run(run_id, start, events)``; settings are the run's ``tracking`` config
    section, under ``defaults`` (the agent's own config) and over ``overrides`` (``wal replay --to``).
    """

    name = "backend"
    batch_size = 1000
    all_runs = False
    #: One refused event quarantines its run on this sink: a backend run with a hole in it is worth less
    #: than a whole one replayed after the fix.
    quarantine_scope = "run"

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 defaults: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
                 accept_all_runs: bool = False) -> None:
        if state_dir is None:
            from flightlog.proto.paths import resolve_paths

            state_dir = resolve_paths().data_dir / "sinks"
        self.state_dir = Path(state_dir) / self.name
        self.registry = RunRegistry(self.state_dir / "runs")
        self.ranks = RankView(self.registry)
        self.defaults = dict(defaults or {})
        self.overrides = dict(overrides or {})
        # wal replay: every run in the WAL goes to this backend, whatever its RunStart asked for.
        self.all_runs = accept_all_runs

    def open(self) -> SinkCursor | None:
        # Nothing is created until a run uses this backend (the registry makes its folder on the first put).
        # The backend libraries write files of their own (mlflow.db, mlartifacts/, wandb's run files): the
        # process umask is the one setting that makes those private too.
        restrict_umask()
        return None

    def tracking(self, start: RunStart) -> TrackingConfig:
        run_cfg = start.config.get("tracking") if isinstance(start.config, dict) else None
        return tracking_config(self.defaults, run_cfg if isinstance(run_cfg, dict) else None, self.overrides)

    def run_start(self, run_id: str) -> RunStart | None:
        """The run's RunStart as this sink last saw it (for the engine's quarantine of a whole run)."""
        return self.registry.start_of(run_id)

    def _start_for(self, run_id: str, events: list[tuple[int, Event]]) -> RunStart:
        """The run's RunStart: from this batch (and remembered), or from the registry, or a stand-in."""
        for _, ev in events:
            if type(ev) is RunStart:
                entry = self.registry.get(run_id) or {}
                if entry.get("start") != msgspec.to_builtins(ev):
                    entry = {**entry, "start": msgspec.to_builtins(ev)}
                    entry.setdefault("state", {})
                    self.registry.put(run_id, entry)
                return ev
        start = self.registry.start_of(run_id)
        if start is None:
            # The WAL no longer holds the RunStart (a replay of a partial WAL): name the run by its id.
            log.warning("sink %s: no RunStart for run %s; using its id as the name", self.name, run_id)
            start = RunStart(run_id=run_id, name=run_id, timestamp=events[0][1].timestamp or 0.0)
            self.registry.put(run_id, {"start": msgspec.to_builtins(start), "state": {}})
        return start

    def state_of(self, run_id: str) -> dict[str, Any]:
        entry = self.registry.get(run_id) or {}
        return dict(entry.get("state") or {})

    def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        entry = dict(self.registry.get(run_id) or {})
        entry["state"] = state
        self.registry.put(run_id, entry)

    def write(self, batch: Batch) -> Ack:
        """Each run of the batch on its own: a run the backend refuses for good is reported in the Ack (the
        engine quarantines it here) and the other runs are still written. Retryable and unknown errors
        propagate: the whole batch is sent again (every sink skips or deduplicates what it already wrote)."""
        refused: dict[str, str] = {}
        delivered = 0
        for run_id, events in group_by_run(batch.events).items():
            try:
                self._remember_joined(run_id, events)
                shown, ranks = self.ranks.filter(run_id, events)
                if shown:
                    start = self._start_for(run_id, shown)
                    self._write_run(run_id, start, shown)
                self.ranks.save(run_id, ranks)
            except PermanentBackendError as exc:
                refused[run_id] = str(exc)
                self._forget_run(run_id)
                continue
            delivered += len(events)
        return Ack(delivered=delivered, refused=refused)

    def _remember_joined(self, run_id: str, events: list[tuple[int, Event]]) -> None:
        """Another rank's RunStart stands for the run until rank 0's comes: the agent of a node without rank 0
        never sees that one, and its backend still needs the run's name and settings (and its node)."""
        entry = self.registry.get(run_id)
        if entry is not None and "start" in entry:
            return
        for _, ev in events:
            if type(ev) is RunStart and ev.rank:
                self.registry.put(run_id, {**(entry or {}), "start": msgspec.to_builtins(ev),
                                           "state": (entry or {}).get("state") or {}})
                return

    def _forget_run(self, run_id: str) -> None:
        """Drop in-memory state of a run the backend refused (subclasses with open handles override)."""

    def _write_run(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
