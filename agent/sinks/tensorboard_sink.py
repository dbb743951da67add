"""The TensorBoard sink: each run's events into TensorBoard event files under
``<tracking.tensorboard_log_dir>/<run name>-<run_id>``.

Scalars of one step go into one ``Event`` (one ``Summary`` with every value), encoded here without a
protobuf object per value; hparams, text and the run's description and tags use tensorboardX's summary
builders. Records are written by this module rather than tensorboardX's ``FileWriter``: that writer computes
CRC-32C in pure Python (about 4 MB/s here) on a background thread, which caps it far below what a sink must
sustain, and it cannot tell us which bytes are durable. Here each batch is one ``write`` + ``fsync``, after
which ``.flightlog-tb.json`` in the run's directory records the file's committed size and the last seq
written; on reopen anything past the committed size is cut off, so a batch re-sent after a crash is written
exactly once.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from flightlog.proto.errors import BackendError, PermanentBackendError, RetryableBackendError
from flightlog.proto.events import (
    Alert,
    Artifact,
    CheckpointSaved,
    Event,
    Histogram,
    HyperParams,
    Image,
    Metrics,
    RunEnd,
    RunStart,
    SystemStats,
    Tags,
    Text,
)
from flightlog.proto.osutil import PRIVATE_FILE_MODE, make_dirs

from ._common import RunSinkBase, atomic_write_json, flatten, image_bytes, png_size, read_json, safe_name
from ._errors import ErrorTable, Rule
from .tb_records import ScalarEventEncoder, crc32c_many, masked_crc32c_many, record_bytes

__all__ = ["STATUS_TAG", "TB_ERRORS", "ScalarEventEncoder", "TensorBoardTracker", "crc32c_many", "masked_crc32c_many", "record_bytes"]

log = logging.getLogger("flightlog.agent.sinks")

#: TensorBoard's error table: a value the encoders cannot take is permanent; file system trouble retryable.
TB_ERRORS = ErrorTable("TensorBoard", [
    Rule((ValueError, TypeError, OverflowError, struct.error, UnicodeError), "permanent"),
    Rule((OSError,), "retryable"),
])

STATE_FILE = ".flightlog-tb.json"
#: The text summary recording how the run ended (completed, failed, killed, crashed) and why.
STATUS_TAG = "flightlog/status"
_FILE_MARK = ".flightlog"  # our event files carry this, so recovery never touches anyone else's

def _proto_event(wall_time: float, step: int, summary: Any = None, file_version: str | None = None) -> bytes:
    from tensorboardX.proto.event_pb2 import Event as PbEvent

    ev = PbEvent(wall_time=wall_time, step=step)
    if summary is not None:
        ev.summary.CopyFrom(summary)
    if file_version is not None:
        ev.file_version = file_version
    return ev.SerializeToString()  # type: ignore[no-any-return]


def _text_event(key: str, text: str, step: int, wall_time: float) -> bytes:
    from tensorboardX.summary import text as text_summary

    return _proto_event(wall_time, step, text_summary(key, text))


def _end_text(ev: RunEnd) -> str:
    """The run's end for TensorBoard's text tab: the status, then the reason if there is one."""
    return f"**{ev.status}**" + (f"\n\n{ev.error}" if ev.error else "")


def _histogram_event(ev: Histogram) -> bytes:
    from tensorboardX.proto.summary_pb2 import HistogramProto, Summary

    histo = HistogramProto(min=ev.min, max=ev.max, num=ev.count, sum=ev.sum, sum_squares=ev.sum_squares,
                           bucket_limit=ev.bucket_limits, bucket=ev.bucket_counts)
    return _proto_event(ev.timestamp, ev.step, Summary(value=[Summary.Value(tag=ev.key, histo=histo)]))


def _image_event(ev: Image, png: bytes) -> bytes:
    from tensorboardX.proto.summary_pb2 import Summary

    width, height = png_size(png)
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    return _proto_event(ev.timestamp, ev.step, Summary(value=[Summary.Value(tag=ev.key, image=image)]))


def _hparam_value(v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return str(v)


# --- the sink ------------------------------------------------------------------------------------------


class _TbRun:
    """One run's open event file and its committed state."""

    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.directory = directory
        self.state = state
        self.fd = -1
        self.ended = bool(state.get("ended"))


class TensorBoardTracker(RunSinkBase):
    """Sink ``tensorboard``: event files per run, exactly once across crashes and replays."""

    name = "tensorboard"
    batch_size = 2000

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self._runs: dict[str, _TbRun] = {}
        self._enc = ScalarEventEncoder()
        self._host = socket.gethostname()
        self.created_dirs: list[Path] = []  # the folders it made (access.group shares them: agent.sharing)

    # --- per-run files ---

    def run_dir(self, start: RunStart) -> Path:
        base = self.tracking(start).tensorboard_log_dir
        return Path(os.path.expanduser(base)) / f"{safe_name(start.name)}-{safe_name(start.run_id, 64)}"

    def _open_run(self, run_id: str, start: RunStart) -> _TbRun:
        run = self._runs.get(run_id)
        if run is not None:
            return run
        run = self._open_dir(run_id, self.run_dir(start))
        self._runs[run_id] = run
        return run

    def _open_dir(self, run_id: str, d: Path) -> _TbRun:
        try:
            self.created_dirs.extend(make_dirs(d))
            if not d.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(d))
        except OSError as exc:
            raise PermanentBackendError(f"cannot create TensorBoard directory {d}: {exc}") from exc
        state = read_json(d / STATE_FILE) or {}
        if state.get("run_id") not in (None, run_id):
            raise PermanentBackendError(f"{d} holds TensorBoard state of run {state.get('run_id')}, not {run_id}")
        state.setdefault("run_id", run_id)
        state.setdefault("seq", -1)
        state.setdefault("hparams", {})
        state.setdefault("last", {})
        run = _TbRun(d, state)
        self._recover(run)
        return run

    def _recover(self, run: _TbRun) -> None:
        """Cut off what was written but never committed (a crash between write and state save)."""
        committed = run.state.get("file")
        for p in run.directory.iterdir():
            if "tfevents" not in p.name or _FILE_MARK not in p.name:
                continue
            if p.name == committed:
                size = int(run.state.get("size", 0))
                if p.stat().st_size > size:
                    log.info("TensorBoard: %s: cutting %d uncommitted bytes", p, p.stat().st_size - size)
                    with open(p, "r+b") as f:
                        f.truncate(size)
                        os.fsync(f.fileno())
            else:
                # A file whose first commit never happened: nothing in it counts.
                log.info("TensorBoard: removing uncommitted event file %s", p)
                p.unlink()

    def _fd(self, run: _TbRun) -> int:
        if run.fd >= 0:
            return run.fd
        name = run.state.get("file")
        if name and (run.directory / name).exists():
            run.fd = os.open(run.directory / name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            return run.fd
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{safe_name(self._host)}{_FILE_MARK}"
        path = run.directory / name
        run.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                        PRIVATE_FILE_MODE)
        head = record_bytes([_proto_event(now, 0, file_version="brain.Event:2")])
        os.write(run.fd, head)
        os.fsync(run.fd)
        run.state["file"], run.state["size"] = name, len(head)
        atomic_write_json(run.directory / STATE_FILE, run.state)
        return run.fd

    # --- writing ---

    def _write_run(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        try:
            self._write_events(run_id, start, events)
        except BackendError:
            raise
        except Exception as exc:
            err = TB_ERRORS.translate(exc, f"writing run {start.name!r}")
            if err is exc:
                raise
            raise err from exc

    def _write_events(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        by_rank: dict[int, list[tuple[int, Event]]] = {}
        rest: list[tuple[int, Event]] = []
        for seq, ev in events:
            # distributed.log_ranks: all: rank k's points (keys rank<k>/...) go to the sub-directory rank<k>,
            # under their own keys, so TensorBoard draws the ranks as runs side by side.
            if isinstance(ev, Metrics) and ev.values and all(k.startswith(f"rank{ev.rank}/") for k in ev.values):
                cut = len(f"rank{ev.rank}/")
                by_rank.setdefault(ev.rank, []).append(
                    (seq, Metrics(ev.run_id, ev.step, ev.timestamp, {k[cut:]: v for k, v in ev.values.items()},
                                  ev.rank)))
            else:
                rest.append((seq, ev))
        last = max((seq for seq, _ in events), default=-1)
        for rank, rank_events in sorted(by_rank.items()):
            self._write_rank(run_id, start, rank, rank_events, last)
        self._write_main(run_id, start, rest)

    def _write_rank(self, run_id: str, start: RunStart, rank: int, events: list[tuple[int, Event]],
                    last: int) -> None:
        """One rank's points into ``<run dir>/rank<k>``, exactly once (its own committed seq)."""
        key = f"{run_id}\0rank{rank}"
        run = self._runs.get(key)
        if run is None:
            run = self._open_dir(run_id, self.run_dir(start) / f"rank{rank}")
            self._runs[key] = run
        done = run.state["seq"]
        enc = self._enc.encode
        payloads = [enc(ev.timestamp, ev.step, ev.values) for seq, ev in events
                    if seq > done and isinstance(ev, Metrics)]
        if last > done:
            self._commit(run, payloads, last)

    def _write_main(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        run = self._open_run(run_id, start)
        done = run.state["seq"]
        payloads: list[bytes] = []
        last = run.state["last"]
        enc = self._enc.encode
        max_seq = done
        end: RunEnd | None = None
        for seq, ev in events:
            if seq <= done:
                continue  # written before a crash or by an earlier replay
            max_seq = seq
            if isinstance(ev, Metrics):
                if ev.values:
                    payloads.append(enc(ev.timestamp, ev.step, ev.values))
                    last.update(ev.values)
            elif isinstance(ev, SystemStats):
                if ev.values:  # the monitor's keys already read system/...
                    payloads.append(enc(ev.timestamp, ev.step, ev.values))
            elif isinstance(ev, Histogram):
                payloads.append(_histogram_event(ev))
            elif isinstance(ev, Image):
                png = image_bytes(ev)
                if png:
                    payloads.append(_image_event(ev, png))
            elif isinstance(ev, Alert):
                payloads.append(_text_event(f"alerts/{ev.level}", ev.message, 0, ev.timestamp))
            elif isinstance(ev, HyperParams):
                run.state["hparams"].update({k: _hparam_value(v) for k, v in flatten(ev.params).items()})
                body = "\n".join(f"| {k} | {v} |" for k, v in flatten(ev.params).items())
                payloads.append(_text_event("hparams", "| param | value |\n|---|---|\n" + body, 0,
                                            ev.timestamp or start.timestamp))
            elif isinstance(ev, Text):
                payloads.append(_text_event(ev.key, ev.text, ev.step, ev.timestamp or time.time()))
            elif isinstance(ev, Tags):
                body = "\n".join(f"* {k}: {v}" for k, v in ev.tags.items())
                payloads.append(_text_event("tags", body, 0, ev.timestamp or time.time()))
            elif isinstance(ev, RunStart):
                if ev.description:
                    payloads.append(_text_event("description", ev.description, 0, ev.timestamp))
                if ev.tags:
                    payloads.append(_text_event("tags", "\n".join(f"* {x}" for x in ev.tags), 0, ev.timestamp))
            elif isinstance(ev, RunEnd):
                end = ev
                payloads.extend(self._hparams_events(run, ev))
                payloads.append(_text_event(STATUS_TAG, _end_text(ev), 0, ev.timestamp))
            elif isinstance(ev, CheckpointSaved):
                if ev.metrics:
                    payloads.append(enc(ev.timestamp, ev.step, ev.metrics, "checkpoint/"))
            elif isinstance(ev, Artifact):
                pass  # TensorBoard has no artifact store; the local store and MLflow keep them
        if max_seq == done:
            return
        self._commit(run, payloads, max_seq)
        if end is not None:
            self._finish(run_id, run)

    def _hparams_events(self, run: _TbRun, end: RunEnd) -> list[bytes]:
        hp = run.state["hparams"]
        if not hp:
            return []
        from tensorboardX.summary import hparams

        metrics = {k: float(v) for k, v in run.state["last"].items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        exp, ssi, sei = hparams(hp, metrics)
        return [_proto_event(end.timestamp, 0, s) for s in (exp, ssi, sei)]

    def _commit(self, run: _TbRun, payloads: list[bytes], max_seq: int) -> None:
        try:
            fd = self._fd(run)
            data = record_bytes(payloads)
            if data:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            run.state["size"] = int(run.state.get("size", 0)) + len(data)
            run.state["seq"] = max_seq
            atomic_write_json(run.directory / STATE_FILE, run.state)
        except OSError as exc:
            # Disk full or gone: the next try truncates back to the committed size and writes again.
            self._drop(run)
            raise RetryableBackendError(f"TensorBoard write to {run.directory} failed: {exc}") from exc

    def _drop(self, run: _TbRun) -> None:
        if run.fd >= 0:
            os.close(run.fd)
            run.fd = -1
        for rid, r in list(self._runs.items()):
            if r is run:
                del self._runs[rid]

    def _finish(self, run_id: str, run: _TbRun) -> None:
        run.state["ended"] = True
        atomic_write_json(run.directory / STATE_FILE, run.state)
        self._drop(run)
        for key in [k for k in self._runs if k.startswith(f"{run_id}\0")]:
            self._drop(self._runs[key])  # its ranks' files

    def _forget_run(self, run_id: str) -> None:
        run = self._runs.get(run_id)
        if run is not None:
            self._drop(run)

    def close(self) -> None:
        for run in list(self._runs.values()):
            self._drop(run)
