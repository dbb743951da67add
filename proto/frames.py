"""Frame layout shared by the ring, spill files and WAL records: ``u32 length | payload | pad to 8``.

A length of ``PAD_MARKER`` is a padding frame: it fills the rest of the ring before a wrap and is never
copied into a WAL record.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

from .errors import ProtocolError

__all__ = ["PAD_MARKER", "frame_stride", "append_frame", "iter_frames", "count_frames", "U32"]

PAD_MARKER = 0xFFFFFFFF
U32 = struct.Struct("<I")
_unpack_u32 = U32.unpack_from


def frame_stride(payload_len: int) -> int:
    """Bytes a frame with this payload occupies: 4-byte header plus payload, rounded up to 8."""
    return (payload_len + 4 + 7) & ~7


def append_frame(buf: bytearray, payload: bytes) -> None:
    """Append one framed payload (with zero padding) to ``buf``."""
    buf += U32.pack(len(payload))
    buf += payload
    pad = frame_stride(len(payload)) - 4 - len(payload)
    if pad:
        buf += b"\0" * pad


def iter_frames(buf: bytes | memoryview) -> Iterator[memoryview]:
    """Yield each payload in a run of frames; a frame running past the end raises ProtocolError."""
    view = memoryview(buf)
    end = len(view)
    pos = 0
    while pos < end:
        if end - pos < 4:
            raise ProtocolError(f"truncated frame header at byte {pos} of {end}")
        (n,) = _unpack_u32(view, pos)
        if n == PAD_MARKER:
            raise ProtocolError(f"padding frame at byte {pos} inside a frame run")
        if pos + 4 + n > end:
            raise ProtocolError(f"frame at byte {pos} claims {n} bytes, only {end - pos - 4} left")
        yield view[pos + 4 : pos + 4 + n]
        pos += (n + 11) & ~7


def count_frames(buf: bytes | memoryview) -> int:
    """Number of frames in a run of frames (validating that they tile the buffer exactly)."""
    end = len(buf)
    pos = 0
    count = 0
    while pos < end:
        if end - pos < 4:
            raise ProtocolError(f"truncated frame header at byte {pos} of {end}")
        (n,) = _unpack_u32(buf, pos)
        if n == PAD_MARKER or pos + 4 + n > end:
            raise ProtocolError(f"bad frame length {n} at byte {pos} of {end}")
        pos += (n + 11) & ~7
        count += 1
    return count
