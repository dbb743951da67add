"""flightlog.agent.wal: the agent's write-ahead log (segment files of CRC-checked, seq-numbered records).

``format`` is the pure on-disk format (encode, decode, scan with resync); ``log`` does the file I/O.
"""
from .format import SRC_INTERNAL, SRC_RING, SRC_SPILL, WalCursor
from .log import WAL, FsyncMode, RecoveryReport, SegmentInfo, WALReader, inspect_wal

__all__ = [
    "WAL",
    "WALReader",
    "WalCursor",
    "RecoveryReport",
    "SegmentInfo",
    "FsyncMode",
    "inspect_wal",
    "SRC_RING",
    "SRC_SPILL",
    "SRC_INTERNAL",
]
