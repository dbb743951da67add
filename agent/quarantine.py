"""Where a sink's refused events go: ``<data_dir>/quarantine/<sink>/``, a WAL directory that
``flightlog wal replay`` reads like any other (after the fix, ``--to`` the backend again); the store keeps a
row per quarantined event or run with its reason."""
from __future__ import annotations

import threading
from pathlib import Path

from flightlog.proto.codec import encode_event
from flightlog.proto.frames import append_frame

from .engine import Quarantined
from .sinks._common import safe_name
from .wal import SRC_INTERNAL, WAL

__all__ = ["QuarantineBox"]


class QuarantineBox:
    """One quarantine WAL per sink, opened on first use and kept open (appends are rare)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._wals: dict[str, WAL] = {}
        self._lock = threading.Lock()

    def directory(self, sink: str) -> Path:
        return self.root / safe_name(sink)

    def put(self, sink: str, records: list[Quarantined]) -> Path:
        """Append the records' events (re-encoded, in order) durably; returns the directory."""
        buf = bytearray()
        n = 0
        for r in records:
            for _, ev in r.events:
                append_frame(buf, encode_event(ev))
                n += 1
        with self._lock:
            wal = self._wals.get(sink)
            if wal is None:
                wal = self._wals[sink] = WAL(self.directory(sink), fsync="never", segment_bytes=16 << 20)
            if n:
                wal.append(bytes(buf), n, f"quarantine:{sink}", SRC_INTERNAL)
                wal.sync()
        return self.directory(sink)

    def close_sink(self, sink: str) -> None:
        with self._lock:
            wal = self._wals.pop(sink, None)
        if wal is not None:
            wal.close()
