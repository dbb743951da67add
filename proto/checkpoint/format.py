"""Checkpoint file format, sans-IO: safetensors header, chunk plan, byte grouping, index and footer.

A checkpoint is a safetensors byte stream (``u64 header length | JSON header | tensor data``) cut into
chunks, each compressed on its own (one zstd frame, one gzip member, or kept raw), followed by a trailer:

* ``zstd`` / ``zstd-bytegroup``: a zstd *skippable* frame holding ``index JSON | footer``;
  ``zstd -d`` skips it, so a ``zstd`` file decompresses to a standard safetensors file.
* ``gzip``: a last, empty gzip member whose FEXTRA field holds ``index JSON | footer``.
* ``none``: the plain safetensors file, whose last tensor ``__flightlog__`` (U8[40]) is the footer.

Footer (40 bytes, little-endian): ``magic | u64 payload_len | 16-byte xxh3-128 of the payload |
u32 index_len | u32 crc32(index + footer[:36])``, where the payload is every byte before the trailer.
The index lists the frames as ``[c_off, c_len, u_off, u_len]`` (byte-grouped frames add the element
width, the compressed size of each byte plane, and 1 if float elements were bit-rotated), so one tensor can be read by decompressing only the
frames that overlap it.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec

from flightlog.proto.errors import CheckpointCorrupt, CheckpointError

__all__ = [
    "CODECS",
    "DTYPE_SIZES",
    "EXTENSIONS",
    "FOOTER",
    "FOOTER_MAGIC",
    "FOOTER_TENSOR",
    "FORMAT_VERSION",
    "Footer",
    "TensorInfo",
    "ZSTD_MAGIC",
    "GZIP_MAGIC",
    "SKIPPABLE_MAGIC",
    "build_header",
    "parse_header",
    "plan_chunks",
    "chunk_size_for",
    "encode_footer",
    "decode_footer",
    "byte_group",
    "byte_ungroup",
    "gzip_trailer_member",
    "checksum_text",
    "validate_frames",
    "Frame",
    "Index",
    "StoredMeta",
    "MAX_HEADER",
    "decode_index",
    "decode_stored_meta",
    "frame_list",
    "max_ratio",
]

FORMAT_VERSION = 1
CODECS = ("zstd", "gzip", "none", "zstd-bytegroup")
EXTENSIONS = {
    "zstd": ".safetensors.zst",
    "gzip": ".safetensors.gz",
    "none": ".safetensors",
    "zstd-bytegroup": ".safetensors.zbg",  # not plain `zstd -d` material: the planes are shuffled
}

#: safetensors dtype name -> element size in bytes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}

FOOTER_MAGIC = b"FLCKPT\x00\x01"
FOOTER = struct.Struct("<8sQ16sII")
FOOTER_TENSOR = "__flightlog__"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
SKIPPABLE_MAGIC = 0x184D2A5E
MAX_HEADER = 100 << 20  # safetensors' own limit
_MAX_INDEX = 16 << 20
_MAX_SIZE = 1 << 62  # any offset or length in a file (bounds the arithmetic; real files are far smaller)
_MAX_DIMS = 64
_MAX_META_DEPTH = 64  # the state JSON's nesting (optimizer state is ~6 deep); decode_value recurses on it
# The most bytes one compressed byte can stand for: a zstd RLE block is 4 bytes for 128 KiB of output,
# deflate's longest match is 258 bytes in a bit or so (1032:1). A frame declaring more is a lie.
_RATIO = {"zstd": 1 << 15, "zstd-bytegroup": 1 << 15, "gzip": 1032, "none": 1}
_GZIP_EMPTY_TAIL = b"\x03\x00" + b"\x00" * 8  # empty deflate block, crc32 0, isize 0


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the data section: offsets relative to the start of the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Footer:
    payload_len: int
    digest: bytes
    index_len: int


def checksum_text(digest: bytes) -> str:
    return "xxh3_128:" + digest.hex()


def build_header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str], *, footer_tensor: bool = False) -> bytes:
    """The safetensors prefix (``u64 length | JSON``), padded with spaces so the data is 8-byte aligned."""
    head: dict[str, Any] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    end = 0
    for t in tensors:
        head[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
        end = max(end, t.end)
    if footer_tensor:
        head[FOOTER_TENSOR] = {"dtype": "U8", "shape": [FOOTER.size], "data_offsets": [end, end + FOOTER.size]}
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


_Size = Annotated[int, msgspec.Meta(ge=0, le=_MAX_SIZE)]
_T = TypeVar("_T")


class _TensorEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One tensor of a safetensors header, as the format defines it."""

    dtype: str
    shape: Annotated[list[_Size], msgspec.Meta(max_length=_MAX_DIMS)]
    data_offsets: tuple[_Size, _Size]


class Frame(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One indexed frame: ``[c_off, c_len, u_off, u_len]``, byte-grouped ones ``+ [width, plane sizes, rotated]``."""

    c_off: _Size
    c_len: _Size
    u_off: _Size
    u_len: _Size
    width: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    planes: Annotated[list[_Size], msgspec.Meta(max_length=8)] = []
    rotate: Annotated[int, msgspec.Meta(ge=0, le=1)] = 0


class Index(msgspec.Struct):
    """The trailer's frame index (unknown fields are ignored: a newer writer may append some)."""

    v: int
    codec: str
    header_len: _Size
    total: _Size
    frames: Annotated[list[Frame], msgspec.Meta(max_length=1 << 20)]
    level: int = 0


class StoredMeta(msgspec.Struct):
    """The ``flightlog`` entry of a checkpoint's ``__metadata__``: the state that is not tensors. Only the
    shape is checked here; the values under ``model_extra``, ``optimizer``, ... are flightlog's encoded
    state (see ``flightlog.checkpoint.state``)."""

    epoch: int
    step: int
    metrics: dict[str, float] = {}
    aliases: dict[str, str] = {}
    is_best: bool | None = None
    run_id: str | None = ""
    config_hash: str | None = ""
    git_commit: str | None = ""
    created: float = 0.0
    torch: str = ""
    model_extra: dict[str, Any] = {}
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] = {}


def _decode_json(raw: bytes | memoryview, typ: type[_T], name: str, what: str) -> _T:
    """Decode JSON against a schema; every failure (msgspec skips unknown values recursively, hence
    RecursionError on absurd nesting) is CheckpointCorrupt naming the file."""
    try:
        return msgspec.json.decode(raw, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{name}: {what} is malformed: {_short(exc)}") from exc


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 200 else text[:200] + "..."


def parse_header(prefix: bytes | memoryview, name: str, data_len: int | None = None
                 ) -> tuple[int, dict[str, str], list[TensorInfo]]:
    """Parse and bounds-check a safetensors header: returns (header length incl. the 8-byte prefix,
    metadata, tensors sorted by offset). ``data_len``, when known, must equal the tensors' extent."""
    if len(prefix) < 8:
        raise CheckpointCorrupt(f"{name}: truncated before the safetensors header")
    (n,) = struct.unpack_from("<Q", prefix)
    if n > MAX_HEADER or len(prefix) < 8 + n:
        raise CheckpointCorrupt(f"{name}: safetensors header length {n} is out of bounds")
    # Values are at most two levels deep (a tensor's shape), so nothing deeper is ever decoded or skipped.
    head = _decode_json(prefix[8:8 + n], dict[str, dict[str, str | list[int]]], name, "the safetensors header")
    raw_meta = head.pop("__metadata__", {})
    meta = {k: v for k, v in raw_meta.items() if isinstance(v, str)}
    if len(meta) != len(raw_meta):
        raise CheckpointCorrupt(f"{name}: safetensors __metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    for key, info in head.items():
        try:
            entry = msgspec.convert(info, _TensorEntry)
        except msgspec.ValidationError as exc:
            raise CheckpointCorrupt(f"{name}: tensor {key!r} has a malformed header entry: {_short(exc)}") from exc
        dtype, shape, (begin, end) = entry.dtype, tuple(entry.shape), entry.data_offsets
        if dtype not in DTYPE_SIZES:
            raise CheckpointCorrupt(f"{name}: tensor {key!r} has an unknown dtype {dtype!r}")
        if math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
            raise CheckpointCorrupt(f"{name}: tensor {key!r}: offsets {begin}..{end} do not match {dtype}{list(shape)}")
        tensors.append(TensorInfo(key, dtype, shape, begin, end))
    tensors.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in tensors:
        if t.begin != pos:
            raise CheckpointCorrupt(f"{name}: tensor {t.name!r} starts at {t.begin}, expected {pos} (gap or overlap)")
        pos = t.end
    if data_len is not None and pos != data_len:
        raise CheckpointCorrupt(f"{name}: tensors cover {pos} bytes but the data section holds {data_len}")
    return 8 + n, meta, tensors


def decode_index(raw: bytes | memoryview, name: str) -> Index:
    """The trailer's index, schema-checked (types, bounds, version); its frames are checked by
    :func:`validate_frames`."""
    if len(raw) > _MAX_INDEX:
        raise CheckpointCorrupt(f"{name}: damaged trailer (index length {len(raw)})")
    index = _decode_json(raw, Index, name, "the frame index")
    if index.v != FORMAT_VERSION:
        raise CheckpointCorrupt(f"{name}: checkpoint format version {index.v}; this flightlog reads version "
                                f"{FORMAT_VERSION} (upgrade flightlog to read newer files)")
    if index.header_len > MAX_HEADER + 8:
        raise CheckpointCorrupt(f"{name}: safetensors header length {index.header_len} is out of bounds")
    for f in index.frames:
        if not f.planes and (f.width != 1 or f.rotate):  # a width or rotation with no planes to apply it to
            raise CheckpointCorrupt(f"{name}: the frame index is inconsistent at frame {frame_list(f)}")
    return index


def frame_list(f: Frame) -> list[Any]:
    """The list form the reader and codecs use: 4 items, or 7 for a byte-grouped frame."""
    head: list[Any] = [f.c_off, f.c_len, f.u_off, f.u_len]
    return head + [f.width, list(f.planes), f.rotate] if f.planes else head


def max_ratio(codec: str) -> int:
    return _RATIO.get(codec, 1)


def decode_stored_meta(text: str | None, name: str, tensor_names: Iterable[str]) -> dict[str, Any]:
    """Parse and check the ``flightlog`` metadata entry: a JSON object of the :class:`StoredMeta` shape,
    nested at most 64 deep, whose aliases name tensors of the file. Returns it as a dict."""
    if text is None:
        raise CheckpointCorrupt(f"{name}: no flightlog metadata in the safetensors header")
    try:
        obj = json.loads(text)  # not msgspec: Python's json writes NaN/Infinity (a plateau scheduler's best)
    except (ValueError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{name}: the flightlog metadata is not valid JSON: {_short(exc)}") from exc
    if not isinstance(obj, dict):
        raise CheckpointCorrupt(f"{name}: the flightlog metadata is a JSON {type(obj).__name__}, not an object")
    if _depth(obj, _MAX_META_DEPTH) > _MAX_META_DEPTH:
        raise CheckpointCorrupt(f"{name}: the flightlog metadata is nested more than {_MAX_META_DEPTH} deep")
    try:
        meta = msgspec.convert(obj, StoredMeta)
    except msgspec.ValidationError as exc:
        raise CheckpointCorrupt(f"{name}: the flightlog metadata is malformed: {_short(exc)}") from exc
    names = set(tensor_names)
    for alias, target in meta.aliases.items():
        if target not in names:
            raise CheckpointCorrupt(f"{name}: alias {alias!r} points at {target!r}, which the file does not hold")
    return obj


def _depth(obj: Any, cap: int) -> int:
    """Nesting depth of a decoded JSON value, without recursion; stops counting past ``cap``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, d)
            if d > cap:
                break
            stack.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def chunk_size_for(total: int, base: int = 8 << 20, max_chunks: int = 1024) -> int:
    """Chunk size: ``base``, grown so a file never needs more than ``max_chunks`` frames (index size)."""
    size = max(base, -(-total // max_chunks))
    return -(-size // (1 << 20)) * (1 << 20)


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def plan_chunks(tensors: Sequence[TensorInfo], data_len: int, chunk: int, *, grouped: bool
                ) -> list[tuple[int, int, int, bool]]:
    """Split the data section into ``(offset, length, element width, is float)`` chunks.

    Byte-grouped chunks never mix element widths or floats with integers, and always hold whole
    elements; plain chunks are fixed-size slices (width 1).
    """
    if not grouped:
        return [(off, min(chunk, data_len - off), 1, False) for off in range(0, data_len, chunk)]
    runs: list[tuple[int, int, int, bool]] = []
    run_start, kind, pos = 0, (1, False), 0
    for t in tensors:
        if t.end == t.begin:
            continue
        k = (DTYPE_SIZES[t.dtype], t.dtype in FLOAT_DTYPES)
        if k != kind and pos > run_start:
            runs.append((run_start, pos - run_start, *kind))
            run_start = pos
        kind, pos = k, t.end
    if pos > run_start:
        runs.append((run_start, pos - run_start, *kind))
    if pos < data_len:
        runs.append((pos, data_len - pos, 1, False))
    out: list[tuple[int, int, int, bool]] = []
    for start, length, w, is_float in runs:
        step = max(w, chunk - chunk % w)
        out.extend((off, min(step, start + length - off), w, is_float)
                   for off in range(start, start + length, step))
    return out


_UINTS = {2: "<u2", 4: "<u4", 8: "<u8"}


def byte_group(chunk: bytes | memoryview, width: int, rotate: bool = False) -> list[bytes]:
    """Split elements into byte planes (plane i holds byte i of every element). With ``rotate`` (floats),
    each element is first rotated left by one bit, so the last plane holds exactly the top 8 exponent
    bits (bf16/fp32) and the sign joins the mantissa's plane."""
    if width == 1:
        return [bytes(chunk)]
    import numpy as np  # lazy: only the byte-grouped codec needs it

    words = np.frombuffer(chunk, dtype=_UINTS[width])
    if rotate:
        bits = np.uint64(width * 8).astype(words.dtype)
        one = np.ones(1, dtype=words.dtype)[0]
        words = (words << one) | (words >> (bits - one))
    arr = words.view(np.uint8).reshape(-1, width)
    return [arr[:, i].tobytes() for i in range(width)]


def byte_ungroup(planes: Sequence[bytes], width: int, rotate: bool = False) -> bytes:
    if width == 1:
        return bytes(planes[0])
    import numpy as np

    n = len(planes[0])
    out = np.empty((n, width), dtype=np.uint8)
    for i, p in enumerate(planes):
        out[:, i] = np.frombuffer(p, dtype=np.uint8)
    words = out.view(_UINTS[width]).reshape(-1)
    if rotate:
        bits = np.uint64(width * 8).astype(words.dtype)
        one = np.ones(1, dtype=words.dtype)[0]
        words = (words >> one) | (words << (bits - one))
    return words.tobytes()


def encode_footer(payload_len: int, digest: bytes, index: bytes) -> bytes:
    head = FOOTER.pack(FOOTER_MAGIC, payload_len, digest, len(index), 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(index + head))


def decode_footer(raw: bytes, index: bytes | None, name: str) -> Footer:
    """Check the footer's magic (and, with ``index``, the CRC over index + footer)."""
    if len(raw) != FOOTER.size:
        raise CheckpointCorrupt(f"{name}: truncated (no complete flightlog footer)")
    magic, payload_len, digest, index_len, crc = FOOTER.unpack(raw)
    if magic != FOOTER_MAGIC:
        raise CheckpointCorrupt(
            f"{name}: no flightlog footer at the end: the file is truncated, damaged, or was not written by "
            "flightlog (a plain safetensors file loads with safetensors itself)"
        )
    if index is not None and zlib.crc32(index + raw[:-4]) != crc:
        raise CheckpointCorrupt(f"{name}: the index or footer fails its CRC (damaged trailer)")
    return Footer(payload_len, digest, index_len)


def gzip_trailer_member(payload: bytes) -> bytes:
    """An empty gzip member carrying ``payload`` in its FEXTRA field (``gzip -d`` ignores it)."""
    if len(payload) > 65535 - 4:
        raise CheckpointError(f"checkpoint index too large for the gzip trailer ({len(payload)} bytes)")
    extra = b"FL" + struct.pack("<H", len(payload)) + payload
    header = GZIP_MAGIC + b"\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff" + struct.pack("<H", len(extra))
    return header + extra + _GZIP_EMPTY_TAIL


GZIP_TAIL_LEN = len(_GZIP_EMPTY_TAIL)


def validate_frames(frames: Iterable[Sequence[Any]], payload_len: int, total: int, name: str,
                    codec: str = "zstd", *, start: int = 0, overhead: int = 0) -> None:
    """Frames must tile the compressed payload (from byte ``start``) and the uncompressed stream exactly,
    in order, and none may declare more output than its codec can make of its compressed bytes (so sizes
    are bounded by the file before anything is allocated). Byte-grouped frames need a width of 1, 2, 4 or
    8, whole elements, and one plane per byte. A sealed frame's ``c_len`` includes ``overhead`` bytes
    (nonce and tag) around the compressed bytes."""
    c_pos, u_pos = start, 0
    ratio = max_ratio(codec)
    for f in frames:
        if len(f) < 4 or f[0] != c_pos or f[2] != u_pos or f[1] < overhead or f[3] < 0:
            raise CheckpointCorrupt(f"{name}: the frame index is inconsistent at frame {list(f)[:4]}")
        inner = f[1] - overhead
        if len(f) > 4 and (len(f) != 7 or f[4] not in _UINTS and f[4] != 1 or len(f[5]) != f[4]
                           or sum(f[5]) != inner or f[6] not in (0, 1) or f[3] % f[4]):
            raise CheckpointCorrupt(f"{name}: the frame index is inconsistent at frame {list(f)[:4]}")
        planes = f[5] if len(f) > 4 else [inner]
        if codec == "none" and f[3] != inner:  # raw bytes: a frame holds exactly what it stores
            raise CheckpointCorrupt(f"{name}: the frame index is inconsistent at frame {list(f)[:4]}")
        if any(f[3] // len(planes) > p * ratio for p in planes):
            raise CheckpointCorrupt(f"{name}: frame at byte {f[0]} claims {f[3]} bytes from {f[1]}, more than "
                                    f"{codec} can hold (a crafted or damaged index)")
        c_pos += f[1]
        u_pos += f[3]
    if c_pos != payload_len or u_pos != total:
        raise CheckpointCorrupt(f"{name}: the frame index covers {c_pos}/{u_pos} bytes, expected {payload_len}/{total}")
