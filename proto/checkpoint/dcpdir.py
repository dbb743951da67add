"""A distributed (DCP) checkpoint directory without torch: its sealed metadata file, the rank files it
lists with their checksums, and verification, for the CLI and the agent (the SDK writes and reads them)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import xxhash

from flightlog.proto.errors import CheckpointCorrupt, CheckpointError, CheckpointIncomplete

from .format import checksum_text
from .reader import verify_file

__all__ = ["METADATA_NAME", "RANK_FILE", "MAX_METADATA", "seal", "unseal", "sealed_checksum", "read_sealed",
           "rank_files", "verify_dir", "is_dcp_dir"]

METADATA_NAME = "flightlog-dcp.json"
RANK_FILE = re.compile(r"rank\d{5}\.safetensors(\.zst|\.zbg|\.gz)?")
MAX_METADATA = 256 << 20


def seal(body: bytes) -> bytes:
    """``body`` then a last line with its xxh3-128: a flipped bit in the metadata is caught, not obeyed."""
    return body + b"\n" + checksum_text(xxhash.xxh3_128_digest(body)).encode() + b"\n"


def sealed_checksum(raw: bytes) -> str:
    """The checksum line of sealed bytes: the checkpoint's checksum in the registry (it covers every rank
    file's checksum, which the metadata lists)."""
    return raw.removesuffix(b"\n").rpartition(b"\n")[2].decode("ascii", "replace")


def unseal(raw: bytes, where: str) -> bytes:
    """The body of sealed bytes, or CheckpointCorrupt naming ``where``."""
    if len(raw) > MAX_METADATA:
        raise CheckpointCorrupt(f"{where}: the metadata is larger than {MAX_METADATA} bytes")
    if not raw.endswith(b"\n"):  # the writer ends it with one: without it the file was cut
        raise CheckpointCorrupt(f"{where}: the checkpoint metadata is truncated (no final newline)")
    body, _, tail = raw[:-1].rpartition(b"\n")
    if tail != checksum_text(xxhash.xxh3_128_digest(body)).encode():
        raise CheckpointCorrupt(f"{where}: the checkpoint metadata fails its checksum (damaged or truncated)")
    return body


def is_dcp_dir(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir()


def read_sealed(directory: str | os.PathLike[str]) -> bytes:
    """The metadata file's bytes (bounded); CheckpointIncomplete when the save never committed it."""
    path = Path(directory) / METADATA_NAME
    try:
        with open(path, "rb") as f:
            return f.read(MAX_METADATA + 1)
    except FileNotFoundError as exc:
        what = "no such directory" if not Path(directory).is_dir() else f"no {METADATA_NAME} in it"
        raise CheckpointIncomplete(f"{directory}: {what}: not a complete flightlog distributed checkpoint (a "
                                   "save that did not finish, or another format); load an earlier checkpoint") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint metadata: {exc.strerror or exc}") from exc


class _Storage(msgspec.Struct):
    storage: list[tuple[str, list[int] | None, int | None, str, str, str]]


def rank_files(directory: str | os.PathLike[str], expected_checksum: str | None = None) -> list[tuple[str, str]]:
    """(rank file name, its checksum) for each file the committed metadata lists."""
    where = str(Path(directory) / METADATA_NAME)
    raw = read_sealed(directory)
    body = unseal(raw, where)
    if expected_checksum and sealed_checksum(raw) != expected_checksum:
        raise CheckpointCorrupt(f"{where}: checksum {sealed_checksum(raw)} is not the registered {expected_checksum}")
    try:
        doc = msgspec.json.decode(body, type=_Storage)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{where}: the checkpoint metadata is malformed: {exc}") from exc
    files: dict[str, str] = {}
    for entry in doc.storage:
        name, checksum = entry[3], entry[5]
        if not RANK_FILE.fullmatch(name):  # a name only: a crafted file must not point outside the directory
            raise CheckpointCorrupt(f"{where}: {name!r} is not a rank file name")
        if files.setdefault(name, checksum) != checksum:
            raise CheckpointCorrupt(f"{where}: {name} is listed with two checksums")
    return sorted(files.items())


def verify_dir(directory: str | os.PathLike[str], expected_checksum: str | None = None, *, deep: bool = True) -> str:
    """Verify the metadata (its seal, the registered checksum) and every rank file against the checksum the
    metadata recorded; returns the checkpoint's checksum or raises CheckpointCorrupt/CheckpointError."""
    files = rank_files(directory, expected_checksum)
    for name, checksum in files:
        verify_file(Path(directory) / name, checksum, deep=deep)
    return sealed_checksum(read_sealed(directory))
