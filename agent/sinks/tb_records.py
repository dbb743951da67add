"""TensorBoard's bytes without TensorBoard: the protobuf encoding of scalar ``Event`` messages, CRC-32C (native
when google-crc32c or crc32c is installed, else column-wise in numpy) and TFRecord framing. Sans-IO."""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

__all__ = ["ScalarEventEncoder", "crc32c_many", "masked_crc32c_many", "record_bytes"]

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
