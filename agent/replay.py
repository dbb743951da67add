"""`flightlog wal replay DIR --to BACKEND=TARGET`: deliver a WAL directory (e.g. a node's, copied off after an
outage) into TensorBoard, MLflow or W&B, whatever sinks its runs originally asked for.

Resumable: the cursor is saved (temp file + fsync + rename) after every batch the backend acknowledged, in a
state directory that also holds the sink's per-run registry. Idempotent: the sinks themselves skip what they
already wrote (TensorBoard, W&B) or the backend deduplicates it (MLflow's metric key).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flightlog.proto.errors import ConfigError, PermanentBackendError, ProtocolError, RetryableBackendError

from .retry import RetryPolicy
from .sinks._common import atomic_write_json, read_json
from .sinks.base import Batch, SinkCursor

__all__ = ["add_subparsers", "parse_target", "make_sink", "replay", "ReplayResult"]

log = logging.getLogger("flightlog.replay")

BACKENDS = ("tensorboard", "mlflow", "wandb")


def parse_target(text: str) -> tuple[str, str]:
    """``tensorboard=PATH`` | ``mlflow=URI`` | ``wandb=offline|online`` -> (backend, target)."""
    backend, sep, target = text.partition("=")
    backend = backend.strip().lower()
    if not sep or backend not in BACKENDS or not target:
        raise ConfigError(
            f"--to {text!r}: expected tensorboard=PATH, mlflow=URI or wandb=offline|online"
        )
    if backend == "wandb" and target not in ("offline", "online"):
        raise ConfigError(f"--to {text!r}: W&B mode must be 'offline' or 'online'")
    return backend, target


def make_sink(backend: str, target: str, state_dir: Path, extra: dict[str, Any] | None = None) -> Any:
    """The sink for one replay target, serving every run in the WAL with the target's setting on top."""
    from flightlog.agent import sinks

    overrides: dict[str, Any] = dict(extra or {})
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


def _load_cursor(path: Path) -> SinkCursor:
    data = read_json(path)
    if not data:
        return SinkCursor()
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
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayResult:
    """Deliver every event of ``wal_dir`` from the saved cursor on into ``sink``; returns counts."""
    from flightlog.agent.runner import decode_batch
    from flightlog.agent.wal import WALReader, inspect_wal

    wal_dir = Path(wal_dir)
    totals = inspect_wal(wal_dir)["totals"]
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cursor_path = state_dir / "cursor.json"
    cursor = _load_cursor(cursor_path)
    last_seq = totals["last_seq"]
    total = max(0, (last_seq + 1 if last_seq is not None else 0) - cursor.seq)
    result = ReplayResult()
    policy = policy or RetryPolicy(initial=1.0, maximum=30.0)
    rng = random.Random()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="ev", desc=f"replay -> {sink.name}", file=sys.stderr, dynamic_ncols=True)
    bad = 0

    def on_bad(seq: int, exc: ProtocolError) -> None:
        nonlocal bad
        bad += 1
        log.error("event seq %d cannot be decoded and is skipped: %s", seq, exc)

    t0 = time.monotonic()
    sink.open()
    reader = WALReader(wal_dir)
    try:
        while True:
            items, new_cursor = reader.read(cursor, max_events=sink.batch_size)
            if not items:
                break
            events = decode_batch(items, on_bad)
            if run_ids is not None:
                events = [(s, ev) for s, ev in events if ev.run_id in run_ids]
            if events:
                attempt = 0
                while True:
                    try:
                        sink.write(Batch(events, new_cursor, {ev.run_id for _, ev in events}))
                        break
                    except RetryableBackendError as exc:
                        attempt += 1
                        if attempt >= max_attempts:
                            raise RetryableBackendError(
                                f"{exc} (gave up after {attempt} tries; run the same command again to resume at "
                                f"seq {cursor.seq})", exc.retry_after,
                            ) from exc
                        delay = policy.delay(attempt, rng, exc.retry_after)
                        log.warning("%s; retry %d in %.1f s", exc, attempt, delay)
                        sleep(delay)
                    except PermanentBackendError as exc:
                        raise PermanentBackendError(f"{exc} (replay stopped at seq {cursor.seq})") from exc
            advanced = new_cursor.seq - cursor.seq
            cursor = new_cursor
            atomic_write_json(cursor_path, {"segment": cursor.segment, "offset": cursor.offset, "seq": cursor.seq})
            result.events += len(events)
            result.batches += 1
            if bar is not None:
                bar.update(advanced)
    finally:
        reader.close()
        sink.close()
        if bar is not None:
            bar.close()
    result.seconds = time.monotonic() - t0
    result.cursor = cursor
    if bad:
        log.warning("%d undecodable events were skipped", bad)
    return result


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    wal_dir = Path(args.dir)
    targets = [parse_target(t) for t in args.to]
    runs = set(args.run) if args.run else None
    for backend, target in targets:
        if backend == "tensorboard":
            target = str(Path(target).expanduser().absolute())
        state = default_state_dir(wal_dir, backend, target, Path(args.state_dir) if args.state_dir else None)
        if args.restart:
            (state / "cursor.json").unlink(missing_ok=True)
        sink = make_sink(backend, target, state)
        res = replay(wal_dir, sink, state, run_ids=runs, progress=not args.no_progress)
        rate = res.events / res.seconds if res.seconds else 0.0
        print(f"{backend}={target}: {res.events} events delivered in {res.seconds:.1f} s ({rate:,.0f} events/s); "
              f"cursor at seq {res.cursor.seq}, state in {state}", file=sys.stderr)
    return 0


def add_subparsers(wal_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on the ``flightlog wal`` subcommands (``wal_subparsers``: its add_subparsers())."""
    p: argparse.ArgumentParser = wal_subparsers.add_parser(
        "replay", help="deliver a WAL directory into TensorBoard, MLflow or W&B (resumable, idempotent)"
    )
    p.add_argument("dir", help="the WAL directory (e.g. DATA_DIR/wal, or a copy of it)")
    p.add_argument("--to", action="append", required=True, metavar="BACKEND=TARGET",
                   help="tensorboard=PATH | mlflow=URI | wandb=offline|online (repeatable)")
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
