"""The ring both processes agree on: layout of a single-producer/single-consumer ring in shared memory, its
cursor arithmetic and spill-file names. The producer is ``flightlog.ring`` (SDK), the consumer
``flightlog.agent.ring``.

Layout (one file in /dev/shm): a 4096-byte header, then a power-of-two data area. Each cursor is one u64
word on its own cache line packing a frame counter (high 29 bits, counted modulo 2**28) and a byte counter
(low 35 bits, modulo 2**35): the agent learns how many frames a span holds without walking them, so ingest
is a memcpy and a CRC. The producer copies a frame in, then publishes the write word with one aligned 8-byte
store; the agent publishes the read word only after the frames are in its WAL. On x86-64 stores become visible
in program order, so no lock, no syscall and no thread is needed; elsewhere the SDK falls back to the control
socket (see ``ring_supported``).

Doorbell (as io_uring's ``need_wakeup``): before the agent waits it sets the sleeping word (to the number of
this sleep, never 0), re-reads the write word, and only then blocks on its doorbell socket
(``AgentPaths.doorbell``, next to the rings). A producer that sees the word set after publishing sends that
socket one datagram, once per sleep number; while the agent is awake the word is 0 and the log call makes no
syscall. Neither side fences between its store and its load, so on x86-64 the two
can rarely pass each other in the store buffers: the agent's periodic scan (about once a second) bounds the
delay of such an event, and nothing is lost. A producer that never rings (an older SDK) is drained by that scan.

Producer death: the header names the producer's pid, its start time and its run. A ring whose producer is
gone without setting the closed word (SIGKILL, SIGTERM, the OOM killer) is drained to the end by the agent,
which then ends the run as ``crashed`` unless another live producer still holds it. The start time tells a
reused pid from the producer (fields added in layout 1 at offsets older SDKs left zero).
"""
from __future__ import annotations

import mmap
import os
import platform
import struct
from pathlib import Path

from flightlog.proto.errors import RingError

__all__ = [
    "HEADER_SIZE", "RING_MAGIC", "OFF_SLEEPING", "LAYOUT_VERSION", "PRODUCER_ID_LIMIT", "RUN_ID_LIMIT",
    "ring_supported", "spill_path",
    "pack_cursor", "unpack_cursor", "cursor_distance", "cursor_reached", "write_header_str", "read_header_str",
]

RING_MAGIC = b"FLRING01"
HEADER_SIZE = 4096

# Header offsets. Producer-owned and consumer-owned fields sit on different cache lines.
OFF_MAGIC = 0  # 8 bytes
OFF_VERSION = 8  # u32 layout version, u32 schema version
OFF_SIZE = 16  # u64 data size
OFF_PID = 24  # u32 pid, i32 rank
OFF_CLOSED = 32  # u64: 1 once the producer finished cleanly
OFF_CREATED = 40  # u64 ns
OFF_PID_START = 48  # u64: the producer process's start time (clock ticks since boot, proto.osutil), 0 unknown
OFF_WRITE = 64  # u64 write cursor (producer)
OFF_READ = 128  # u64 read cursor (consumer)
OFF_SPILL_GEN = 192  # u64 newest spill generation the producer opened (producer)
OFF_DROPPED = 200  # u64 events dropped by policy "drop" (producer)
OFF_SPILLED = 208  # u64 events written to spill files (producer)
OFF_PAD = 216  # u64 byte counter (mod 2**35, BYTE_MASK) where the newest padding frame starts (producer)
OFF_ENDED = 224  # u64: 1 once the run's RunEnd is written (into this ring or its sibling); a producer killed
#                 after that (during finish's flush or checkpoint wait) did not crash (producer)
OFF_CONSUMED_OFF = 256  # u64 bytes of the current spill generation the agent has made durable (consumer)
OFF_CONSUMED_GEN = 264  # u64 spill generation the agent is reading (consumer)
OFF_SLEEPING = 320  # u64: the agent's sleep number while it waits on its doorbell, else 0 (consumer; own line:
#                    the producer reads it after every publish)
OFF_PRODUCER_ID = 512  # u16 length + utf-8 (at most PRODUCER_ID_LIMIT bytes with the length)
OFF_RUN_ID = 768  # u16 length + utf-8: the run the producer logs (0 length: an older SDK; see RingView.run_id)
OFF_SPILL_DIR = 1024  # u16 length + utf-8
LAYOUT_VERSION = 1
#: Bytes of the producer id field (it used to be 512; the run id field took the second half, which producer ids
#: of ``<run id: at most 128>-<pid>-<6 hex>[-side]`` never reached: the layout version is unchanged).
PRODUCER_ID_LIMIT = 256
RUN_ID_LIMIT = 256

BYTE_BITS = 35
BYTE_MASK = (1 << BYTE_BITS) - 1  # rings are at most 1 GiB, so spans never reach 2**34
FRAME_MASK = (1 << 28) - 1  # frames are counted modulo 2**28; at most 2**27 (8 bytes each) fit in 1 GiB
_FRAME_ONE = 1 << BYTE_BITS
# The producer adds ``stride + _FRAME_ONE`` to its word on the fast path (two small additions instead of
# shifts and masks) and renormalises in the slow path, which runs at least once per lap of the ring: so the
# byte field never carries (the fast path never reaches the physical end) and the frame field stays below
# 2**28 + 2**27, inside its 29 bits.

_U64 = struct.Struct("=Q")  # native: pack_into is a single 8-byte store, no byte-by-byte loop
_U16 = struct.Struct("<H")
_HDR = struct.Struct("<I")


def pack_cursor(frames: int, nbytes: int) -> int:
    return ((frames & FRAME_MASK) << BYTE_BITS) | (nbytes & BYTE_MASK)


def unpack_cursor(word: int) -> tuple[int, int]:
    return (word >> BYTE_BITS) & FRAME_MASK, word & BYTE_MASK


def cursor_distance(older: int, newer: int) -> tuple[int, int]:
    """(frames, bytes) from cursor word ``older`` to ``newer``, modular."""
    return ((newer >> BYTE_BITS) - (older >> BYTE_BITS)) & FRAME_MASK, ((newer - older) & BYTE_MASK)


def cursor_reached(read_word: int, target_bytes: int) -> bool:
    """True when the read cursor is at or past ``target_bytes`` (a producer byte counter)."""
    d = (target_bytes - read_word) & BYTE_MASK
    return d == 0 or d >= 1 << (BYTE_BITS - 1)


def ring_supported() -> bool:
    """True where plain stores are seen in program order by other cores (x86-64's TSO).

    ``FLIGHTLOG_TRANSPORT=socket`` forces the socket fallback (used by its tests on x86-64).
    """
    if os.environ.get("FLIGHTLOG_TRANSPORT") == "socket":
        return False
    return platform.machine().lower() in ("x86_64", "amd64")


def spill_path(spill_dir: str | os.PathLike[str], producer_id: str, gen: int) -> Path:
    return Path(spill_dir) / f"{producer_id}.{gen}.spill"


def write_header_str(mm: mmap.mmap, off: int, value: str, limit: int) -> None:
    raw = value.encode()
    if len(raw) > limit - 2:
        raise RingError(f"ring header field too long ({len(raw)} bytes): {value!r}")
    _U16.pack_into(mm, off, len(raw))
    mm[off + 2 : off + 2 + len(raw)] = raw


def read_header_str(mm: mmap.mmap, off: int) -> str:
    (n,) = _U16.unpack_from(mm, off)
    return bytes(mm[off + 2 : off + 2 + n]).decode()
