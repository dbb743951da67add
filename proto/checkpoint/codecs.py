"""Per-chunk codecs: zstd frames, gzip members, raw bytes, and byte-grouped zstd planes.

Each function works on one chunk and keeps no state shared between threads, so the writer and the
reader can run them on a thread pool (zstandard and zlib release the GIL while they work).
"""
from __future__ import annotations

import threading
import zlib
from typing import Any

import zstandard

from flightlog.proto.errors import CheckpointCorrupt, CheckpointError

from .format import CODECS, byte_group, byte_ungroup

__all__ = ["check_level", "compress_chunk", "decompress_frame", "decompress_into", "check_frame"]

_local = threading.local()


def check_level(codec: str, level: int) -> None:
    if codec not in CODECS:
        raise CheckpointError(f"unknown checkpoint compression {codec!r}; use one of {', '.join(CODECS)}")
    if codec.startswith("zstd") and not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise CheckpointError(f"compression_level {level} is out of range for zstd (-7..22 are useful)")
    if codec == "gzip" and not 0 <= level <= 9:
        raise CheckpointError(f"compression_level {level} is out of range for gzip (0..9)")


def _cctx(level: int) -> Any:
    cache = getattr(_local, "cctx", None)
    if cache is None or cache[0] != level:
        cache = (level, zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True))
        _local.cctx = cache
    return cache[1]


def _dctx() -> Any:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _exponent_cctx(level: int) -> Any:
    # Measured on real bf16/fp32 weights: the exponent plane (few distinct bytes, short repeats) packs
    # best with zstd's fast strategy and long minimum matches; only levels >= 19 do better.
    lvl = level if level >= 19 else 1
    cache = getattr(_local, "ectx", None)
    if cache is None or cache[0] != lvl:
        params = zstandard.ZstdCompressionParameters.from_level(lvl, min_match=7, write_checksum=1,
                                                                write_content_size=1)
        cache = (lvl, zstandard.ZstdCompressor(compression_params=params))
        _local.ectx = cache
    return cache[1]


def compress_chunk(codec: str, level: int, chunk: bytes | memoryview, width: int = 1,
                   is_float: bool = False) -> tuple[bytes, list[int]]:
    """Compress one chunk; returns the bytes and, for byte grouping, the size of each plane's frame."""
    if codec == "zstd":
        return _cctx(level).compress(chunk), []
    if codec == "gzip":
        c = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: a gzip member (zlib.compress has no wbits on 3.10)
        return c.compress(chunk) + c.flush(), []
    if codec == "none":
        return bytes(chunk), []
    planes = byte_group(chunk, width, is_float)
    frames = [(_exponent_cctx(level) if is_float and i == width - 1 else _cctx(level)).compress(p)
              for i, p in enumerate(planes)]
    return b"".join(frames), [len(f) for f in frames]


def _plain_zstd(codec: str, frame: list[Any]) -> bool:
    """One ordinary zstd frame: the zstd codec, or a byte-grouped chunk kept whole (no plane sizes)."""
    return codec == "zstd" or (codec == "zstd-bytegroup" and len(frame) == 4)


def decompress_into(codec: str, raw: bytes | memoryview, frame: list[Any], name: str, out: memoryview) -> None:
    """Decompress one indexed frame straight into ``out`` (exactly the frame's ``u_len`` bytes). zstd
    frames decode in place, with no intermediate copy, and their content checksum is checked; other
    codecs go through :func:`decompress_frame`."""
    if not _plain_zstd(codec, frame):
        out[:] = decompress_frame(codec, raw, frame, name)
        return
    u_len, filled = frame[3], 0
    try:
        reader = _dctx().stream_reader(raw)
        while filled < u_len:
            k = reader.readinto(out[filled:])
            if not k:
                break
            filled += k
        extra = reader.read(1)  # drives the decoder over the frame's end, where the checksum is checked
    except zstandard.ZstdError as exc:
        raise CheckpointCorrupt(f"{name}: frame at byte {frame[0]} does not decompress: {exc}") from exc
    if filled != u_len or extra:
        raise CheckpointCorrupt(f"{name}: frame at byte {frame[0]} holds {'more' if extra else filled} bytes, "
                                f"index says {u_len}")


def _zstd_capped(raw: bytes | memoryview, limit: int, name: str, where: int) -> bytes:
    """One zstd frame of at most ``limit`` bytes. zstd's one-shot decompress allocates whatever a frame
    declares (ignoring any cap), or the whole cap when it declares nothing: so a frame must declare
    ``limit`` or nothing, and one that declares nothing is read in pieces, as its output arrives."""
    declared = zstandard.frame_content_size(raw)
    if declared not in (-1, limit):
        raise CheckpointCorrupt(f"{name}: frame at byte {where} declares {declared} bytes, index says {limit}")
    if declared == limit:
        return _dctx().decompress(raw)  # type: ignore[no-any-return]
    reader, parts, got = _dctx().stream_reader(raw), [], 0
    while got <= limit:
        part = reader.read(min(limit + 1 - got, 1 << 20))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def check_frame(codec: str, raw: bytes | memoryview, frame: list[Any], name: str, scratch: memoryview) -> None:
    """Decompress one indexed frame through ``scratch`` and drop the bytes: the frame decodes, checks its
    content checksum (zstd) and holds exactly what the index says, in memory bounded by ``scratch``."""
    u_len = frame[3]
    planes = frame[5] if len(frame) > 4 and codec == "zstd-bytegroup" else [frame[1]]
    width = len(planes)
    try:
        if codec == "gzip":
            _drain_gzip(raw, u_len, name, frame[0], len(scratch))
            return
        pos = 0
        for s in planes:
            _drain_zstd(raw[pos:pos + s], u_len // width, name, frame[0], scratch)
            pos += s
    except (zstandard.ZstdError, zlib.error) as exc:
        raise CheckpointCorrupt(f"{name}: frame at byte {frame[0]} does not decompress: {exc}") from exc


def _drain_zstd(raw: bytes | memoryview, want: int, name: str, where: int, scratch: memoryview) -> None:
    declared = zstandard.frame_content_size(raw)
    if declared not in (-1, want):
        raise CheckpointCorrupt(f"{name}: frame at byte {where} declares {declared} bytes, index says {want}")
    reader = _dctx().stream_reader(raw)
    got = 0
    while got <= want:
        k = reader.readinto(scratch)
        if not k:
            break
        got += k
    if got != want:
        raise CheckpointCorrupt(f"{name}: frame at byte {where} holds {'more' if got > want else got} bytes, "
                                f"index says {want}")


def _drain_gzip(raw: bytes | memoryview, want: int, name: str, where: int, window: int) -> None:
    d = zlib.decompressobj(wbits=31)
    got, data = 0, raw
    while data and got <= want and not d.eof:
        got += len(d.decompress(data, window))
        data = d.unconsumed_tail
    if got != want or not d.eof or d.unused_data:
        raise CheckpointCorrupt(f"{name}: gzip member at byte {where} is damaged or mis-sized")


def decompress_frame(codec: str, raw: bytes | memoryview, frame: list[Any], name: str) -> bytes:
    """Decompress one indexed frame ``[c_off, c_len, u_off, u_len, (width, plane sizes)]``; any damage
    (or a size other than the index says) is CheckpointCorrupt naming the file."""
    u_len = frame[3]
    out: bytes
    try:
        if _plain_zstd(codec, frame):
            out = _zstd_capped(raw, u_len, name, frame[0])
        elif codec == "gzip":
            d = zlib.decompressobj(wbits=31)
            out = d.decompress(raw, u_len + 1)
            if not d.eof or d.unused_data:
                raise CheckpointCorrupt(f"{name}: gzip member at byte {frame[0]} is damaged or mis-sized")
        elif codec == "none":
            out = bytes(raw)
        else:
            width, sizes = frame[4], frame[5]
            planes, pos = [], 0
            for s in sizes:
                planes.append(_zstd_capped(raw[pos:pos + s], u_len // width, name, frame[0]))
                pos += s
            if any(len(p) * width != u_len for p in planes):
                raise CheckpointCorrupt(f"{name}: byte-grouped frame at byte {frame[0]} has mis-sized planes")
            out = byte_ungroup(planes, width, bool(frame[6]))
    except (zstandard.ZstdError, zlib.error) as exc:
        raise CheckpointCorrupt(f"{name}: frame at byte {frame[0]} does not decompress: {exc}") from exc
    if len(out) != u_len:
        raise CheckpointCorrupt(f"{name}: frame at byte {frame[0]} holds {len(out)} bytes, index says {u_len}")
    return out
