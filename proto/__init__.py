"""flightlog.proto: wire types, codec and schema version. Pure data, no I/O."""
from .codec import decode_control, decode_event, encode_control, encode_event, event_encoder, frame_control
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .events import *  # noqa: F401,F403
from .events import __all__ as _events_all

__all__ = [
    "decode_control",
    "decode_event",
    "encode_control",
    "encode_event",
    "event_encoder",
    "frame_control",
    *_errors_all,
    *_events_all,
]
