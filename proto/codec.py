"""One reused encoder and decoder for events and control messages; decode errors become ProtocolError."""
from __future__ import annotations

import struct

import msgspec

from .errors import ProtocolError
from .events import Control, Event

__all__ = [
    "encode_event",
    "decode_event",
    "encode_control",
    "decode_control",
    "frame_control",
    "FRAME_HEADER",
    "event_encoder",
]

#: One encoder for the whole process; ``encode_into`` reuses caller buffers on the hot path.
event_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(Event)
_control_decoder = msgspec.msgpack.Decoder(Control)
FRAME_HEADER = struct.Struct("<I")


def encode_event(event: Event) -> bytes:
    return event_encoder.encode(event)


def decode_event(payload: bytes | memoryview) -> Event:
    """Decode one event payload; anything malformed or truncated raises ProtocolError."""
    try:
        return _event_decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError; anything else is a bug to see
        raise ProtocolError(f"cannot decode event frame ({len(payload)} bytes): {exc}") from exc


def encode_control(message: Control) -> bytes:
    return event_encoder.encode(message)


def frame_control(message: Control) -> bytes:
    """A control message as sent on the socket: ``u32 length | payload``."""
    payload = event_encoder.encode(message)
    return FRAME_HEADER.pack(len(payload)) + payload


def decode_control(payload: bytes | memoryview) -> Control:
    try:
        return _control_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"cannot decode control message ({len(payload)} bytes): {exc}") from exc
