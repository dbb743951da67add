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

import logging
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flightlog.proto.errors import PermanentBackendError, RetryableBackendError
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

from ._common import RunSinkBase, atomic_write_json, flatten, image_bytes, png_size, read_json, safe_name

__all__ = ["TensorBoardTracker", "ScalarEventEncoder", "crc32c_many", "masked_crc32c_many", "record_bytes"]

log = logging.getLogger("flightlog.agent.sinks")

STATE_FILE = ".flightlog-tb.json"
_FILE_MARK = ".flightlog"  # our event files carry this, so recovery never touches anyone else's

# --- sans-IO: protobuf encoding of scalar events and TFRecord framing ---------------------------------

_pack_f = struct.Struct("<f").pack
_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_F32_MAX = 3.4028234663852886e38


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as protobuf encodes it: ten bytes of two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _f32(v: Any) -> bytes:
    """A value as float32 bytes; out-of-range finite values saturate to ±inf like a C cast would."""
    try:
        return _pack_f(v)
    except (OverflowError, struct.error, TypeError):
        x = float(v)
        if math.isnan(x):
            return _pack_f(x)
        return _pack_f(math.copysign(math.inf, x) if abs(x) > _F32_MAX else x)


class ScalarEventEncoder:
    """``Event{wall_time, step, summary{value*: {tag, simple_value}}}`` as bytes, one call per step.

    Field numbers: Event.wall_time=1 (double), step=2 (int64), summary=5; Summary.value=1;
    Summary.Value.tag=1, simple_value=2 (float). The bytes before each value are cached per tag.
    """

    def __init__(self) -> None:
        self._prefix: dict[str, bytes] = {}

    def _make_prefix(self, tag: str) -> bytes:
        t = tag.encode()
        inner = b"\x0a" + _varint(len(t)) + t + b"\x15"
        pre = b"\x0a" + _varint(len(inner) + 4) + inner
        if len(self._prefix) < 100_000:
            self._prefix[tag] = pre
        return pre

    def encode(self, wall_time: float, step: int, values: Mapping[str, Any], prefix: str = "") -> bytes:
        cache = self._prefix
        parts: list[bytes] = []
        append = parts.append
        for k, v in values.items():
            tag = prefix + k if prefix else k
            pre = cache.get(tag)
            if pre is None:
                pre = self._make_prefix(tag)
            append(pre)
            try:
                append(_pack_f(v))
            except (OverflowError, struct.error, TypeError):
                append(_f32(v))
        summary = b"".join(parts)
        return b"".join((b"\x09", _pack_d(wall_time), b"\x10", _varint(step), b"\x2a", _varint(len(summary)), summary))


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()
_np_table: Any = None
_zero_regs: list[int] = [0xFFFFFFFF]  # CRC register after k zero bytes from the initial value


def _native_crc32c() -> Any:
    for mod, attr in (("google_crc32c", "value"), ("crc32c", "crc32c")):
        try:
            m = __import__(mod)
            return getattr(m, attr)
        except (ImportError, AttributeError):
            continue
    return None


_native = _native_crc32c()


def _crc32c_one(data: bytes) -> int:
    crc = 0xFFFFFFFF
    t = _TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _zero_reg(n: int) -> int:
    regs = _zero_regs
    t = _TABLE
    while len(regs) <= n:
        c = regs[-1]
        regs.append(t[c & 0xFF] ^ (c >> 8))
    return regs[n]


def crc32c_many(chunks: list[bytes]) -> list[int]:
    """CRC-32C of each chunk. Without a native library, equal-ish chunks are done side by side in numpy.

    CRC is linear over GF(2): with a zero initial register, leading zero bytes change nothing, so chunks
    are left-padded to one length and run column by column; the initial value's share (0xFFFFFFFF followed
    by ``len`` zero bytes) is XORed in per chunk afterwards.
    """
    if _native is not None:
        return [_native(c) for c in chunks]
    global _np_table
    import numpy as np

    if _np_table is None:
        _np_table = np.array(_TABLE, dtype=np.uint32)
    out = [0] * len(chunks)
    small = [i for i, c in enumerate(chunks) if len(c) <= 4096]
    for i, c in enumerate(chunks):
        if len(c) > 4096:
            out[i] = _crc32c_one(c)  # rare (long text): not worth a padded column run
    if not small:
        return out
    width = max(len(chunks[i]) for i in small)
    buf = b"".join(bytes(width - len(chunks[i])) + chunks[i] for i in small)
    cols = np.frombuffer(buf, dtype=np.uint8).reshape(len(small), width).T.copy()
    reg = np.zeros(len(small), dtype=np.uint32)
    table = _np_table
    for j in range(width):
        reg = table[(reg ^ cols[j]) & 0xFF] ^ (reg >> 8)
    for pos, i in enumerate(small):
        out[i] = (int(reg[pos]) ^ _zero_reg(len(chunks[i]))) ^ 0xFFFFFFFF
    return out


def masked_crc32c_many(chunks: list[bytes]) -> list[int]:
    return [(((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF for x in crc32c_many(chunks)]


_pack_I = struct.Struct("<I").pack


def record_bytes(payloads: list[bytes]) -> bytes:
    """TFRecord framing of each payload: ``u64 len | u32 masked_crc(len) | data | u32 masked_crc(data)``."""
    if not payloads:
        return b""
    lens = [_pack_q(len(p)) for p in payloads]
    crcs = masked_crc32c_many(lens + payloads)
    n = len(payloads)
    parts: list[bytes] = []
    for i, p in enumerate(payloads):
        parts += (lens[i], _pack_I(crcs[i]), p, _pack_I(crcs[n + i]))
    return b"".join(parts)


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

    # --- per-run files ---

    def run_dir(self, start: RunStart) -> Path:
        base = self.tracking(start).get("tensorboard_log_dir") or "logs/tensorboard"
        return Path(os.path.expanduser(str(base))) / f"{safe_name(start.name)}-{safe_name(start.run_id, 64)}"

    def _open_run(self, run_id: str, start: RunStart) -> _TbRun:
        run = self._runs.get(run_id)
        if run is not None:
            return run
        d = self.run_dir(start)
        try:
            d.mkdir(parents=True, exist_ok=True)
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
        self._runs[run_id] = run
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
        run.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
        head = record_bytes([_proto_event(now, 0, file_version="brain.Event:2")])
        os.write(run.fd, head)
        os.fsync(run.fd)
        run.state["file"], run.state["size"] = name, len(head)
        atomic_write_json(run.directory / STATE_FILE, run.state)
        return run.fd

    # --- writing ---

    def _write_run(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
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
            t = type(ev)
            if t is Metrics:
                if ev.values:
                    payloads.append(enc(ev.timestamp, ev.step, ev.values))
                    last.update(ev.values)
            elif t is SystemStats:
                if ev.values:  # the monitor's keys already read system/...
                    payloads.append(enc(ev.timestamp, ev.step, ev.values))
            elif t is Histogram:
                payloads.append(_histogram_event(ev))
            elif t is Image:
                png = image_bytes(ev)
                if png:
                    payloads.append(_image_event(ev, png))
            elif t is Alert:
                payloads.append(_text_event(f"alerts/{ev.level}", ev.message, 0, ev.timestamp))
            elif t is HyperParams:
                run.state["hparams"].update({k: _hparam_value(v) for k, v in flatten(ev.params).items()})
                body = "\n".join(f"| {k} | {v} |" for k, v in flatten(ev.params).items())
                payloads.append(_text_event("hparams", "| param | value |\n|---|---|\n" + body, 0,
                                            ev.timestamp or start.timestamp))
            elif t is Text:
                payloads.append(_text_event(ev.key, ev.text, ev.step, ev.timestamp or time.time()))
            elif t is Tags:
                body = "\n".join(f"* {k}: {v}" for k, v in ev.tags.items())
                payloads.append(_text_event("tags", body, 0, ev.timestamp or time.time()))
            elif t is RunStart:
                if ev.description:
                    payloads.append(_text_event("description", ev.description, 0, ev.timestamp))
                if ev.tags:
                    payloads.append(_text_event("tags", "\n".join(f"* {x}" for x in ev.tags), 0, ev.timestamp))
            elif t is RunEnd:
                end = ev
                payloads.extend(self._hparams_events(run, ev))
            elif t is CheckpointSaved:
                if ev.metrics:
                    payloads.append(enc(ev.timestamp, ev.step, ev.metrics, "checkpoint/"))
            elif t is Artifact:
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

    def close(self) -> None:
        for run in list(self._runs.values()):
            self._drop(run)
