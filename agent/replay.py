"""`flightlog wal replay DIR --to BACKEND=TARGET`: deliver a WAL directory (e.g. a node's, copied off after an
outage, or a sink's quarantine ``<data_dir>/quarantine/<sink>`` after a fix) into TensorBoard, MLflow, W&B or a
local store, whatever sinks its runs originally asked for.

The same delivery engine as the agent's live sinks (``runner.SinkRunner`` over ``engine.DeliveryCore``), with
no lingering and a bounded number of retries. Resumable: the cursor is committed after every batch the
backend acknowledged, in ``state.sqlite`` of a state directory that also holds the sink's per-run registry and
the replay's own quarantine. Idempotent: the sinks skip what they already wrote (TensorBoard, W&B) or the
backend deduplicates it (MLflow's metric key).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from flightlog.proto.errors import ConfigError

from .retry import RetryPolicy
from .sinks._common import RunSinkBase, read_json
from .sinks.base import SinkCursor

__all__ = ["ReplayResult", "add_subparsers", "make_sink", "parse_target", "replay"]

log = logging.getLogger("flightlog.replay")

BACKENDS = ("tensorboard", "mlflow", "wandb", "store")
STATE_DB = "state.sqlite"


def parse_target(text: str) -> tuple[str, str]:
    """``tensorboard=PATH`` | ``mlflow=URI`` | ``wandb=offline|online`` | ``store=DB`` -> (backend, target)."""
    backend, sep, target = text.partition("=")
    backend = backend.strip().lower()
    if not sep or backend not in BACKENDS or not target:
        raise ConfigError(
            f"--to {text!r}: expected tensorboard=PATH, mlflow=URI, wandb=offline|online or store=DB"
        )
    if backend == "wandb" and target not in ("offline", "online"):
        raise ConfigError(f"--to {text!r}: W&B mode must be 'offline' or 'online'")
    return backend, target


def make_sink(backend: str, target: str, state_dir: Path, extra: dict[str, Any] | None = None) -> Any:
    """The sink for one replay target, serving every run in the WAL with the target's setting on top."""
    from flightlog.agent import sinks

    overrides: dict[str, Any] = dict(extra or {})
    if backend == "store":
        from .sinks.store import LocalStoreSink

        # Its own cursor name: replaying into a live agent's store must not move the agent's cursor.
        digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
        return LocalStoreSink(target, name=f"replay-{digest}")
    cls: type[RunSinkBase]
    if backend == "tensorboard":
        overrides["tensorboard_log_dir"] = target
        cls = sinks.TensorBoardTracker
    elif backend == "mlflow":
        overrides["mlflow_tracking_uri"] = target
        cls = sinks.MLflowTracker
    else:
        overrides["wandb_mode"] = target
        cls = sinks.WandBTracker
    return cls(state_dir, overrides=overrides, accept_all_runs=True)


def default_state_dir(wal_dir: Path, backend: str, target: str, base: Path | None = None) -> Path:
    """One state directory per target (``BASE/<backend>-<hash of target>``; BASE defaults to DIR/.replay)."""
    digest = hashlib.sha1(f"{backend}={target}".encode()).hexdigest()[:10]
    return (base if base is not None else wal_dir / ".replay") / f"{backend}-{digest}"


class ReplayResult:
    def __init__(self) -> None:
        self.events = 0
        self.batches = 0
        self.seconds = 0.0
        self.cursor = SinkCursor()
        self.quarantined = 0  # events the backend refused for good (in ``quarantine_dir``)
        self.quarantine_dir: Path | None = None


def _legacy_cursor(state_dir: Path) -> SinkCursor | None:
    """The cursor an older flightlog kept in ``cursor.json``."""
    data = read_json(state_dir / "cursor.json")
    if not data:
        return None
    return SinkCursor(int(data["segment"]), int(data["offset"]), int(data["seq"]))


def replay(
    wal_dir: str | Path,
    sink: Any,
    state_dir: Path,
    *,
    run_ids: set[str] | None = None,
    progress: bool = True,
    policy: RetryPolicy | None = None,
    max_attempts: int = 8,
) -> ReplayResult:
    """Deliver every event of ``wal_dir`` from the saved cursor on into ``sink``; returns counts. A batch
    still failing after ``max_attempts`` tries raises RetryableBackendError (run again to resume)."""
    import anyio

    from flightlog.agent.quarantine import QuarantineBox
    from flightlog.agent.runner import CursorStore, SinkRunner
    from flightlog.agent.wal import WALReader, inspect_wal

    wal_dir = Path(wal_dir)
    totals = inspect_wal(wal_dir)["totals"]
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cursors = CursorStore(state_dir / STATE_DB)
    start, _ = cursors.load(sink.name)
    legacy = _legacy_cursor(state_dir)
    if legacy is not None and start.seq == 0:
        cursors.save(sink.name, legacy)
        start = legacy
    last_seq = totals["last_seq"]
    result = ReplayResult()
    bar = None
    if progress:
        from tqdm import tqdm

        total = max(0, (last_seq + 1 if last_seq is not None else 0) - start.seq)
        bar = tqdm(total=total, unit="ev", desc=f"replay -> {sink.name}", file=sys.stderr, dynamic_ncols=True)
    done = [start.seq]

    def on_commit(cursor: SinkCursor) -> None:
        result.batches += 1
        if bar is not None:
            bar.update(cursor.seq - done[0])
        done[0] = cursor.seq

    box = QuarantineBox(state_dir / "quarantine")
    runner = SinkRunner(sink, WALReader(wal_dir), cursors, policy=policy or RetryPolicy(initial=1.0, maximum=30.0),
                        linger=0.0, quarantine=box, max_attempts=max_attempts, until_caught_up=True,
                        on_commit=on_commit, only_runs=run_ids)
    t0 = time.monotonic()
    try:
        anyio.run(runner.run)
    finally:
        runner.feed.close()
        cursors.close()
        if bar is not None:
            bar.close()
    result.seconds = time.monotonic() - t0
    result.events = runner.stats.delivered
    result.cursor = runner.stats.cursor
    result.quarantined = runner.stats.quarantined_events
    result.quarantine_dir = box.directory(sink.name)
    if runner.stats.undecodable:
        log.warning("%d undecodable events were skipped", runner.stats.undecodable)
    return result


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.dir is None:
        from flightlog.proto.errors import FlightlogError

        raise FlightlogError("pass the WAL directory to replay (DATA_DIR/wal, or a copy of it)")
    wal_dir = Path(args.dir)
    targets = [parse_target(t) for t in args.to]
    runs = set(args.run) if args.run else None
    code = 0
    for backend, target in targets:
        if backend == "tensorboard":
            target = str(Path(target).expanduser().absolute())
        state = default_state_dir(wal_dir, backend, target, Path(args.state_dir) if args.state_dir else None)
        sink = make_sink(backend, target, state)
        if args.restart:
            (state / "cursor.json").unlink(missing_ok=True)
            if (state / STATE_DB).exists():
                from flightlog.agent.runner import CursorStore

                reset = CursorStore(state / STATE_DB)
                reset.save(sink.name, SinkCursor())
                reset.close()
        res = replay(wal_dir, sink, state, run_ids=runs, progress=not args.no_progress)
        rate = res.events / res.seconds if res.seconds else 0.0
        print(f"{backend}={target}: {res.events} events delivered in {res.seconds:.1f} s ({rate:,.0f} events/s); "
              f"cursor at seq {res.cursor.seq}, state in {state}", file=sys.stderr)
        if res.quarantined:
            print(f"{backend}={target}: {res.quarantined} events refused for good, kept in {res.quarantine_dir} "
                  f"(fix the cause, then `flightlog wal replay {res.quarantine_dir} --to {backend}=...`)",
                  file=sys.stderr)
            code = 2
    return code


def add_subparsers(wal_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on the ``flightlog wal`` subcommands (``wal_subparsers``: its add_subparsers())."""
    p: argparse.ArgumentParser = wal_subparsers.add_parser(
        "replay", help="deliver a WAL directory into TensorBoard, MLflow or W&B (resumable, idempotent)"
    )
    p.add_argument("dir", nargs="?", help="the WAL directory (e.g. DATA_DIR/wal, or a copy of it); under "
                                          "`flightlog wal replay` also a data directory (default: its data directory's)")
    p.add_argument("--to", action="append", required=True, metavar="BACKEND=TARGET",
                   help="tensorboard=PATH | mlflow=URI | wandb=offline|online | store=DB (repeatable)")
    p.add_argument("--run", action="append", help="only this run id (repeatable)")
    p.add_argument("--state-dir", help="where the cursor and sink state live (default: DIR/.replay/...)")
    p.add_argument("--restart", action="store_true", help="forget the saved cursor (sinks still skip duplicates)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m flightlog.agent.replay DIR --to ...`` (same as ``flightlog wal replay``)."""
    from flightlog.proto.errors import FlightlogError

    parser = argparse.ArgumentParser(prog="flightlog wal")
    add_subparsers(parser.add_subparsers(dest="wal_command", required=True))
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except FlightlogError as exc:
        print(f"flightlog: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
