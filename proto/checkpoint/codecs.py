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

__all__ = ["check_level", "compress_chunk", "decompress_frame", "decompress_into"]

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


def decompress_frame(codec: str, raw: bytes | memoryview, frame: list[Any], name: str) -> bytes:
    """Decompress one indexed frame ``[c_off, c_len, u_off, u_len, (width, plane sizes)]``; any damage
    (or a size other than the index says) is CheckpointCorrupt naming the file."""
    u_len = frame[3]
    out: bytes
    try:
        if _plain_zstd(codec, frame):
            out = _dctx().decompress(raw, max_output_size=u_len)
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
                planes.append(_dctx().decompress(raw[pos:pos + s], max_output_size=u_len // width))
                pos += s
            if any(len(p) * width != u_len for p in planes):
                raise CheckpointCorrupt(f"{name}: byte-grouped frame at byte {frame[0]} has mis-sized planes")
            out = byte_ungroup(planes, width, bool(frame[6]))
    except (zstandard.ZstdError, zlib.error) as exc:
        raise CheckpointCorrupt(f"{name}: frame at byte {frame[0]} does not decompress: {exc}") from exc
    if len(out) != u_len:
        raise CheckpointCorrupt(f"{name}: frame at byte {frame[0]} holds {len(out)} bytes, index says {u_len}")
    return out
