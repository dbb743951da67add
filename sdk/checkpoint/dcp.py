"""torch.distributed.checkpoint storage in flightlog's format: one safetensors + zstd file per rank (with its
checksum) and a JSON metadata file written last, so ``dcp.save`` / ``dcp.async_save`` / ``dcp.load`` (with DCP's
planners: dedup, resharding) read and write flightlog checkpoints. No pickle: a checkpoint never runs code."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader as _DCPReader
from torch.distributed.checkpoint.storage import StorageWriter as _DCPWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from flightlog.checkpoint.state import DTYPES_BY_NAME, TORCH_DTYPES
from flightlog.proto.checkpoint.codecs import check_level
from flightlog.proto.checkpoint.dcpdir import METADATA_NAME, RANK_FILE, read_sealed, seal, sealed_checksum, unseal
from flightlog.proto.checkpoint.format import CODECS, EXTENSIONS, TensorInfo, checksum_text
from flightlog.proto.checkpoint.keys import KeyRing
from flightlog.proto.checkpoint.reader import CheckpointReader
from flightlog.proto.checkpoint.writer import TMP_MARK, DirectFile, write_container
from flightlog.proto.errors import CheckpointCorrupt, CheckpointError, CheckpointIncomplete
from flightlog.proto.osutil import PRIVATE_FILE_MODE, fsync_dir, make_dirs

__all__ = ["StorageWriter", "StorageReader", "METADATA_NAME", "FORMAT", "encode_metadata", "decode_metadata", "seal"]

FORMAT = "flightlog-dcp/1"
_RANK_FILE = RANK_FILE
#: What the coordinator calls once the metadata is durable: (total bytes on disk, the checkpoint's checksum).
OnCommit = Callable[[int, str], None]


@dataclasses.dataclass(frozen=True)
class _RankFile:
    """The coordinator's word to one rank: the file it writes."""

    file: str


@dataclasses.dataclass(frozen=True)
class _Location:
    """Where one write item lives: its rank file, its tensor name there, and that file's checksum."""

    file: str
    name: str
    checksum: str = ""


def _private_write(path: Path, data: bytes) -> None:
    """``data`` into ``path`` durably (0600, fsynced, renamed into place, directory fsynced)."""
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class StorageWriter(_DCPWriter):
    """DCP storage that writes ``path/rankNNNNN.safetensors.zst`` per rank, then ``path/flightlog-dcp.json``.

    ``codec`` / ``level`` / ``threads`` are the single-process checkpoint's (zstd, level 1, all cores).
    ``on_begin()`` runs on the coordinator before any rank writes (an error there fails the save on every
    rank) and ``on_commit(size, checksum)`` once every rank's file and the metadata are durable, before any
    rank's ``dcp.save`` returns: the tracker records and then commits the checkpoint in its registry there.
    A directory holding an older checkpoint is overwritten (``overwrite=False`` refuses): its metadata is
    removed before any rank writes, so a save that dies half-way leaves a partial checkpoint that does
    not load, never a mix of two.
    """

    def __init__(self, path: str | os.PathLike[str], *, codec: str = "zstd", level: int = 1, threads: int = 0,
                 overwrite: bool = True, on_begin: Callable[[], None] | None = None,
                 on_commit: OnCommit | None = None, keys: KeyRing | None = None) -> None:
        super().__init__()
        self.keys = keys  # given: every rank file is sealed with its first key (flightlog.proto.checkpoint.crypto)
        if codec not in CODECS:
            raise CheckpointError(f"unknown checkpoint codec {codec!r}; use one of {', '.join(CODECS)}")
        check_level(codec, level)
        self.path = Path(path)
        self.codec, self.level, self.threads, self.overwrite = codec, level, threads, overwrite
        self.on_begin, self.on_commit = on_begin, on_commit
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise CheckpointError("flightlog's StorageWriter needs use_collectives=True (one metadata file for "
                                  "all ranks, written once every rank's file is durable)")
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.is_coordinator and not self.overwrite and (self.path / METADATA_NAME).exists():
            raise CheckpointError(f"{self.path} already holds a checkpoint and overwrite=False; pass another path")
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Runs on the coordinator before any rank writes: the old metadata goes first, so from here on the
        # directory reads as partial until finish() commits the new one.
        if self.on_begin is not None:
            self.on_begin()
        try:  # by the coordinator alone (after on_begin, which checks who owns the path); ranks write later
            make_dirs(self.path)
        except OSError as exc:
            raise CheckpointError(f"cannot create the checkpoint directory {self.path}: {exc.strerror}") from exc
        meta = self.path / METADATA_NAME
        if meta.exists():
            meta.unlink()
            fsync_dir(self.path)
        ext = EXTENSIONS[self.codec]
        return [dataclasses.replace(p, storage_data=_RankFile(f"rank{i:05d}{ext}")) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target: _RankFile = plan.storage_data
        infos, buf, names = self._pack(plan.items, planner)
        path = self.path / target.file
        tmp = self.path / f".{target.file}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with DirectFile(tmp) as f:
                _, digest = write_container(f, infos, {"format": FORMAT, "rank": str(self.rank)},
                                            memoryview(buf), self.codec, self.level, threads=self.threads,
                                            key=self.keys.primary if self.keys else None, name=str(path))
                f.fsync()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path)
        checksum = checksum_text(digest)
        results = [WriteResult(index=item.index, size_in_bytes=size,
                               storage_data=_Location(target.file, name, checksum))
                   for item, name, size in names]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    @staticmethod
    def _pack(items: list[WriteItem], planner: SavePlanner
              ) -> tuple[list[TensorInfo], bytearray, list[tuple[WriteItem, str, int]]]:
        """Resolve every item into one data buffer. Widest elements first, so every tensor sits aligned to
        its element size (the reader views the bytes in place); byte items (U8) last."""
        blobs: list[tuple[int, str, str, tuple[int, ...], WriteItem, Any]] = []
        for i, item in enumerate(items):
            data = planner.resolve_data(item)
            name = f"{i}:{item.index.fqn}"
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                blobs.append((0, name, "U8", (len(raw),), item, raw))
                continue
            if not isinstance(data, torch.Tensor):
                raise CheckpointError(f"DCP resolved {item.index.fqn!r} to a {type(data).__name__}, not a tensor")
            t = data.detach().to("cpu").contiguous()
            dtype = TORCH_DTYPES.get(t.dtype)
            if dtype is None:
                raise CheckpointError(f"tensor {item.index.fqn!r} has dtype {t.dtype}, which safetensors cannot hold")
            raw_t = t.reshape(-1).view(torch.uint8) if t.numel() else None
            blobs.append((t.element_size(), name, dtype, tuple(t.shape), item, raw_t))
        blobs.sort(key=lambda b: -b[0])
        sizes = [len(b[5]) if isinstance(b[5], bytes) else (b[5].numel() if b[5] is not None else 0) for b in blobs]
        buf = bytearray(sum(sizes))
        view = memoryview(buf)
        infos, names, pos = [], [], 0
        for (_, name, dtype, shape, item, raw), n in zip(blobs, sizes):
            if n:
                view[pos:pos + n] = raw if isinstance(raw, bytes) else raw.numpy()
            infos.append(TensorInfo(name, dtype, shape, pos, pos + n))
            names.append((item, name, n))
            pos += n
        view.release()
        return infos, buf, names

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage = {wr.index: wr.storage_data for rank in results for wr in rank}
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        raw = encode_metadata(metadata)
        _private_write(self.path / METADATA_NAME, raw)
        used = {loc.file for loc in storage.values()}
        for p in self.path.iterdir():  # rank files of an older, wider save are no longer referenced
            if _RANK_FILE.fullmatch(p.name) and p.name not in used:
                p.unlink(missing_ok=True)
        if self.on_commit is not None:
            size = len(raw) + sum((self.path / f).stat().st_size for f in used)
            self.on_commit(size, sealed_checksum(raw))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


class StorageReader(_DCPReader):
    """Reads what :class:`StorageWriter` wrote; every rank file is checked against the checksum the
    metadata recorded before any of its bytes reach a tensor (CheckpointCorrupt otherwise)."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 0, expected_checksum: str | None = None,
                 keys: KeyRing | None = None) -> None:
        super().__init__()
        self.keys = keys  # for encrypted rank files (default: $FLIGHTLOG_CHECKPOINT_KEY)
        self.path = Path(path)
        self.threads = threads
        self.expected_checksum = expected_checksum  # the registry's: the metadata must be the one registered
        self.storage: dict[MetadataIndex, _Location] = {}
        self.load_id = uuid.uuid4().hex
        self._check_complete()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage = {}
        if checkpoint_id:
            self.path = Path(checkpoint_id)
            self._check_complete()
        self.load_id = uuid.uuid4().hex

    def _check_complete(self) -> None:
        """Here, not only in read_metadata: DCP turns read_metadata's errors into an AssertionError's text,
        while the constructor and ``reset`` (dcp.load's ``checkpoint_id``) raise straight to the caller."""
        if not (self.path / METADATA_NAME).is_file():
            raise CheckpointIncomplete(self._missing())

    def _missing(self) -> str:
        what = "no such directory" if not self.path.is_dir() else f"no {METADATA_NAME} in it"
        return (f"{self.path}: {what}: not a complete flightlog distributed checkpoint (a save that did not "
                "finish, or another format); load an earlier checkpoint")

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.path / METADATA_NAME
        raw = read_sealed(self.path)
        if self.expected_checksum and sealed_checksum(raw) != self.expected_checksum:
            raise CheckpointCorrupt(f"{path}: checksum {sealed_checksum(raw)} is not the registered "
                                    f"{self.expected_checksum} (replaced or damaged); load another checkpoint")
        metadata = decode_metadata(raw, str(path))
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[tuple[str, str], list[Any]] = {}
        for req in plan.items:
            loc = self.storage.get(req.storage_index)
            if loc is None:
                raise CheckpointCorrupt(f"{self.path / METADATA_NAME}: no storage entry for {req.storage_index.fqn!r}")
            per_file.setdefault((loc.file, loc.checksum), []).append(req)
        for (file, checksum), reqs in per_file.items():
            self._read_file(file, checksum, reqs, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_file(self, file: str, checksum: str, reqs: list[Any], planner: LoadPlanner) -> None:
        """Decompress and verify one rank file as a whole, then hand its items to the planner."""
        with CheckpointReader(self.path / file, verify=False, expected_checksum=checksum, keys=self.keys) as r:
            data = r.read_data(threads=self.threads, verify=True)
            for req in reqs:
                name = self.storage[req.storage_index].name
                t = r.tensors.get(name)
                if t is None:
                    raise CheckpointCorrupt(f"{r.name}: holds no item {name!r}, which the metadata lists")
                raw = data[t.begin:t.end]
                if req.type == LoadItemType.BYTE_IO:
                    _check_plain(bytes(raw), r.name, name)
                    planner.load_bytes(req, io.BytesIO(bytes(raw)))
                    continue
                dtype = DTYPES_BY_NAME[t.dtype]
                stored = (torch.frombuffer(raw, dtype=dtype) if len(raw) else torch.empty(0, dtype=dtype)).reshape(t.shape)
                src = narrow_tensor_by_index(stored, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != src.size():
                    raise CheckpointCorrupt(f"{r.name}: item {name!r} has shape {list(src.size())}, the load "
                                            f"asks for {list(target.size())}")
                target.copy_(src)
                planner.commit_tensor(req, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike)) and (Path(checkpoint_id) / METADATA_NAME).is_file()


# --- the metadata file: DCP's Metadata as JSON ------------------------------------------------------


class _Chunk(msgspec.Struct, array_like=True):
    offsets: list[int]
    sizes: list[int]


class _Entry(msgspec.Struct):
    kind: Literal["tensor", "bytes"]
    dtype: str = ""
    layout: str = "strided"
    memory_format: str = "contiguous_format"
    requires_grad: bool = False
    pin_memory: bool = False
    size: list[int] = []
    chunks: list[_Chunk] = []


class _Stored(msgspec.Struct, array_like=True):
    fqn: str
    offset: list[int] | None
    index: int | None
    file: str
    name: str
    checksum: str


class _Doc(msgspec.Struct):
    format: str
    state: dict[str, _Entry]
    storage: list[_Stored]
    planner_data: dict[str, list[str | int]] | None = None
    version: str | None = None
    checkpoint_id: str = ""
    save_id: str = ""


def _torch_name(obj: Any) -> str:
    return str(obj).removeprefix("torch.")


def encode_metadata(md: Metadata) -> bytes:
    state: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            state[fqn] = {"kind": "bytes"}
            continue
        p = m.properties
        state[fqn] = {"kind": "tensor", "dtype": _torch_name(p.dtype), "layout": _torch_name(p.layout),
                      "memory_format": _torch_name(p.memory_format), "requires_grad": p.requires_grad,
                      "pin_memory": p.pin_memory, "size": list(m.size),
                      "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks]}
    planner = md.planner_data
    if planner is not None and not (isinstance(planner, dict) and all(
            isinstance(v, (tuple, list)) and all(isinstance(x, (str, int)) for x in v) for v in planner.values())):
        raise CheckpointError("flightlog's StorageWriter stores DCP's default planner data only (a map of "
                              f"names to key paths), got {type(planner).__name__}; use DCP's default planner")
    storage = [[idx.fqn, list(idx.offset) if idx.offset is not None else None, idx.index,
                loc.file, loc.name, loc.checksum] for idx, loc in md.storage_data.items()]
    sm = md.storage_meta
    doc = {"format": FORMAT, "version": md.version, "state": state, "storage": storage,
           "planner_data": None if planner is None else {k: list(v) for k, v in planner.items()},
           "checkpoint_id": str(sm.checkpoint_id or "") if sm else "", "save_id": sm.save_id if sm else ""}
    return seal(json.dumps(doc, separators=(",", ":")).encode())


def _check_plain(raw: bytes, where: str, name: str) -> None:
    """DCP's planners unpickle byte items with ``weights_only=False``; only plain data (numbers, strings,
    lists, dicts, tensors: what ``weights_only=True`` accepts) is handed to them, so a crafted checkpoint
    never runs code."""
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as exc:  # the unpickler raises many kinds on hostile bytes; none may escape untyped
        raise CheckpointCorrupt(f"{where}: item {name!r} is not plain data ({type(exc).__name__}); "
                                "refusing to unpickle it") from exc


def _torch_attr(name: str, kind: type, where: str) -> Any:
    value = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(value, kind):
        raise CheckpointCorrupt(f"{where}: {name!r} is not a torch {kind.__name__}")
    return value


def decode_metadata(raw: bytes, where: str) -> Metadata:
    """The metadata file back into DCP's Metadata; anything malformed is CheckpointCorrupt naming the file."""
    body = unseal(raw, where)
    try:
        doc = msgspec.json.decode(body, type=_Doc)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{where}: the checkpoint metadata is malformed: {exc}") from exc
    if doc.format != FORMAT:
        raise CheckpointCorrupt(f"{where}: format {doc.format!r}; this flightlog reads {FORMAT!r}")
    state: dict[str, Any] = {}
    for fqn, e in doc.state.items():
        if e.kind == "bytes":
            state[fqn] = BytesStorageMetadata()
            continue
        dtype = _torch_attr(e.dtype, torch.dtype, where)
        if dtype not in TORCH_DTYPES:
            raise CheckpointCorrupt(f"{where}: {fqn!r} has dtype {e.dtype!r}, which safetensors cannot hold")
        props = TensorProperties(dtype=dtype, layout=_torch_attr(e.layout, torch.layout, where),
                                 requires_grad=e.requires_grad,
                                 memory_format=_torch_attr(e.memory_format, torch.memory_format, where),
                                 pin_memory=e.pin_memory)
        chunks = [ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in e.chunks]
        state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(e.size), chunks=chunks)
    storage: dict[MetadataIndex, _Location] = {}
    for s in doc.storage:
        if not _RANK_FILE.fullmatch(s.file):  # a name only: a crafted file must not point outside the directory
            raise CheckpointCorrupt(f"{where}: {s.file!r} is not a rank file name")
        idx = MetadataIndex(s.fqn, torch.Size(s.offset) if s.offset is not None else None, s.index)
        storage[idx] = _Location(s.file, s.name, s.checksum)
    planner = None if doc.planner_data is None else {k: tuple(v) for k, v in doc.planner_data.items()}
    return Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage, version=doc.version,
                    storage_meta=StorageMeta(checkpoint_id=doc.checkpoint_id, save_id=doc.save_id))
