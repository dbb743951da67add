"""Frame layout shared by the ring, spill files and WAL records: ``u32 length | payload | pad to 8``.

A length of ``PAD_MARKER`` is a padding frame: it fills the rest of the ring before a wrap and is never
copied into a WAL record.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

from .errors import EventTooLarge, ProtocolError

__all__ = ["PAD_MARKER", "MAX_EVENT_BYTES", "check_event_size", "frame_stride", "append_frame", "iter_frames",
           "count_frames", "U32"]

PAD_MARKER = 0xFFFFFFFF
#: The largest encoded event the SDK accepts. Every path carries an event this size whole: a ring (one larger
#: than the ring goes to the spill file), a spill file, one WAL record (256 MiB), one control-socket batch
#: (the socket transport), and the sinks' backends. Bulk data belongs in a file (``log_artifact``), which the
#: WAL carries as a path.
MAX_EVENT_BYTES = 16 << 20
U32 = struct.Struct("<I")
_unpack_u32 = U32.unpack_from


def check_event_size(payload: bytes | bytearray | memoryview) -> None:
    """Refuse an encoded event over ``MAX_EVENT_BYTES`` (EventTooLarge, a ValueError) before any of it is
    written: the one check on the SDK's side, made by the ring producer's slow path and the socket transport."""
    n = len(payload)
    if n > MAX_EVENT_BYTES:
        raise EventTooLarge(
            f"flightlog: {_event_kind(payload)} encodes to {n} bytes ({n / (1 << 20):.1f} MiB), over the limit of "
            f"{MAX_EVENT_BYTES >> 20} MiB ({MAX_EVENT_BYTES} bytes) for one event; it was not logged. Log large "
            "data as a file with log_artifact, or split it into several events"
        )


def _event_kind(payload: bytes | bytearray | memoryview) -> str:
    """The event's type name, from the tag that leads its encoding (a msgpack array, then a short str)."""
    from .events import EVENT_TYPES

    head = bytes(payload[:16])
    skip = {0xDC: 3, 0xDD: 5}.get(head[0], 1) if head else 0
    if len(head) <= skip or not 0xA0 <= head[skip] <= 0xBF:
        return "an event"
    tag = head[skip + 1 : skip + 1 + (head[skip] & 0x1F)].decode("ascii", "replace")
    for cls in EVENT_TYPES:
        if cls.__struct_config__.tag == tag:  # type: ignore[attr-defined]  # every EVENT_TYPES entry is a Struct
            return f"a {cls.__name__} event"
    return "an event"


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
