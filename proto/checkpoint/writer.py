"""The checkpoint writer: staged tensor bytes -> compressed file, atomically and durably, then the
registry, the best pointer and retention. Used by the agent's CheckpointService and, in-process, by a
ModelCheckpointer that has no agent."""
from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from flightlog.proto.audit import record
from flightlog.proto.errors import CheckpointError
from flightlog.proto.osutil import PRIVATE_FILE_MODE, fsync_dir, make_dirs, pid_alive, share_with_group

from .codecs import check_level, compress_chunk
from .crypto import Sealer, key_from_spec
from .format import (
    FORMAT_VERSION,
    SKIPPABLE_MAGIC,
    TensorInfo,
    build_header,
    checksum_text,
    chunk_size_for,
    encode_footer,
    gzip_trailer_member,
    plan_chunks,
)
from .keys import Key, KeyUse, notify_key_use
from .registry import STANDALONE_NAME, Registry

__all__ = ["DirectFile", "write_container", "commit_checkpoint", "recover_interrupted", "tensors_of_spec", "fsync_dir", "TMP_MARK"]

log = logging.getLogger("flightlog.checkpoint")

#: Temporary files are ``.<final name>.tmp-<pid>-<random>``: hidden, and never under a final name.
TMP_MARK = ".tmp-"


def tensors_of_spec(spec: dict[str, Any]) -> list[TensorInfo]:
    return [TensorInfo(n, d, tuple(s), b, e) for n, d, s, b, e in spec["tensors"]]


def _compress(codec: str, level: int, chunk: memoryview, width: int, is_float: bool, sealer: Sealer | None,
              i: int) -> tuple[bytes | bytearray, list[int]]:
    """One chunk compressed (and, with ``sealer``, sealed as frame ``i``: on the same worker thread)."""
    if sealer is None:
        return compress_chunk(codec, level, chunk, width, is_float)
    if codec == "none":
        return sealer.seal(i, chunk), []  # raw bytes: seal them straight from the staging buffer
    blob, planes = compress_chunk(codec, level, chunk, width, is_float)
    return sealer.seal(i, blob), planes


def _pipelined(pieces: Sequence[tuple[memoryview, int, bool]], codec: str, level: int, threads: int,
               sealer: Sealer | None = None) -> Iterator[tuple[bytes | bytearray, list[int]]]:
    """Compress (and seal) chunks on a thread pool, yielding results in order with a bounded number in
    flight. Chunk ``k`` is frame ``k + 1``: frame 0 is the safetensors header."""
    if threads <= 1 or len(pieces) <= 1:
        for i, (chunk, width, is_float) in enumerate(pieces, 1):
            yield _compress(codec, level, chunk, width, is_float, sealer, i)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="flightlog-zstd") as pool:
        pending: deque[Future[tuple[bytes | bytearray, list[int]]]] = deque()
        for i, (chunk, width, is_float) in enumerate(pieces, 1):
            pending.append(pool.submit(_compress, codec, level, chunk, width, is_float, sealer, i))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_container(out: BinaryIO | DirectFile, tensors: Sequence[TensorInfo], metadata: dict[str, str], data: memoryview,
                    codec: str, level: int, *, threads: int = 0, chunk_bytes: int = 0, key: Key | None = None,
                    name: str = "") -> tuple[int, bytes]:
    """Write one checkpoint file to ``out``; returns (size, xxh3-128 digest of the payload). With ``key``
    every frame is sealed with AES-256-GCM (see :mod:`.crypto`; ``name`` is the file the key-use hook
    reports)."""
    check_level(codec, level)
    threads = threads or os.cpu_count() or 1
    if key is not None:
        notify_key_use(KeyUse("seal", key.key_id, name or str(getattr(out, "name", ""))))
        return _write_sealed(out, tensors, metadata, data, codec, level, threads, chunk_bytes, Sealer(key))
    h = xxhash.xxh3_128()
    size = 0

    def put(b: bytes | bytearray | memoryview, hashed: bool = True) -> None:
        nonlocal size
        out.write(b)
        if hashed:
            h.update(b)
        size += len(b)

    total_data = len(data)
    header = build_header(tensors, metadata, footer_tensor=codec == "none")
    chunk = chunk_bytes or chunk_size_for(total_data)
    if codec == "none":
        put(header)
        for off in range(0, total_data, chunk):
            put(data[off:off + chunk])
        put(encode_footer(size, h.digest(), b""), hashed=False)
        return size, h.digest()

    plan = plan_chunks(tensors, total_data, chunk, grouped=codec == "zstd-bytegroup")
    first, _ = compress_chunk("zstd" if codec.startswith("zstd") else codec, level, header)
    frames: list[list[Any]] = [[0, len(first), 0, len(header)]]
    put(first)
    pieces = [(data[off:off + n], w, f) for off, n, w, f in plan]
    for (off, n, w, f), (blob, planes) in zip(plan, _pipelined(pieces, codec, level, threads)):
        frames.append([size, len(blob), len(header) + off, n, w, planes, int(f)] if planes else
                      [size, len(blob), len(header) + off, n])
        put(blob)
    index = _json_bytes({"v": FORMAT_VERSION, "codec": codec, "level": level, "header_len": len(header),
                         "total": len(header) + total_data, "frames": frames})
    digest = h.digest()
    tail = index + encode_footer(size, digest, index)
    if codec == "gzip":
        put(gzip_trailer_member(tail), hashed=False)
    else:
        put(SKIPPABLE_MAGIC.to_bytes(4, "little") + len(tail).to_bytes(4, "little") + tail, hashed=False)
    return size, digest


def _write_sealed(out: BinaryIO | DirectFile, tensors: Sequence[TensorInfo], metadata: dict[str, str],
                  data: memoryview, codec: str, level: int, threads: int, chunk_bytes: int, sealer: Sealer
                  ) -> tuple[int, bytes]:
    """The sealed container: ``envelope | sealed frames (header first) | sealed index | footer``. The
    footer's xxh3 covers the envelope and the frames as stored, so the file verifies without the key; its
    CRC covers the sealed index. Every codec is framed this way, ``none`` included (raw chunks)."""
    h = xxhash.xxh3_128()
    size = 0

    def put(b: bytes | bytearray | memoryview) -> None:
        nonlocal size
        out.write(b)
        h.update(b)
        size += len(b)

    put(sealer.envelope)
    header = build_header(tensors, metadata)
    chunk = chunk_bytes or chunk_size_for(len(data))
    plan = plan_chunks(tensors, len(data), chunk, grouped=codec == "zstd-bytegroup")
    first, _ = compress_chunk("zstd" if codec.startswith("zstd") else codec, level, header)
    sealed = sealer.seal(0, first)
    frames: list[list[Any]] = [[size, len(sealed), 0, len(header)]]
    put(sealed)
    pieces = [(data[off:off + n], w, f) for off, n, w, f in plan]
    for (off, n, w, f), (blob, planes) in zip(plan, _pipelined(pieces, codec, level, threads, sealer)):
        frames.append([size, len(blob), len(header) + off, n, w, planes, int(f)] if planes else
                      [size, len(blob), len(header) + off, n])
        put(blob)
    index = sealer.seal_index(_json_bytes({"v": FORMAT_VERSION, "codec": codec, "level": level,
                                           "header_len": len(header), "total": len(header) + len(data),
                                           "frames": frames}))
    digest = h.digest()
    tail = index + encode_footer(size, digest, index)
    out.write(tail)
    return size + len(tail), digest


class DirectFile:
    """A write-only file that bypasses the page cache (``O_DIRECT``) where the filesystem allows it.

    Bytes are gathered in a page-aligned buffer and written in whole blocks straight from it; ``flush``
    (and so ``fsync`` and ``close``) writes the last block zero-padded and cuts the file back to its true
    size. A checkpoint is written
    once and rarely read back soon, so routing a gigabyte through the page cache only costs the writer a
    copy into freshly allocated cache pages (the slowest part of a plain ``write`` here) and evicts pages
    the training job still wants. Filesystems without ``O_DIRECT`` (tmpfs, some network and FUSE mounts)
    refuse it at open or at the first write; the file then quietly carries on with ordinary writes.
    """

    BLOCK = 4096

    def __init__(self, path: str | os.PathLike[str], buffer_bytes: int = 8 << 20, *, direct: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), PRIVATE_FILE_MODE)
        except OSError as exc:
            if not self.direct or exc.errno != errno.EINVAL:
                raise
            self.direct = False
            self._fd = os.open(path, flags, PRIVATE_FILE_MODE)
        self._buf = mmap.mmap(-1, max(self.BLOCK, buffer_bytes - buffer_bytes % self.BLOCK))
        self._view = memoryview(self._buf)
        self._fill = 0
        self._sealed = False
        self.size = 0

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._sealed:
            raise ValueError("DirectFile: write after flush (a direct file's last block is already out)")
        view = memoryview(data).cast("B")
        n, pos = len(view), 0
        while pos < n:
            k = min(n - pos, len(self._buf) - self._fill)
            self._view[self._fill:self._fill + k] = view[pos:pos + k]
            self._fill += k
            pos += k
            if self._fill == len(self._buf):
                self._drain(self._fill)
        self.size += n
        return n

    def _drain(self, n: int) -> None:
        """Write the first ``n`` buffered bytes (a multiple of BLOCK while direct) and empty the buffer."""
        out = self._view[:n]
        done = 0
        while done < n:
            try:
                done += os.write(self._fd, out[done:])
            except OSError as exc:
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                self._buffered()
        self._fill = 0

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def flush(self) -> None:
        """Write out everything buffered. A direct file's tail goes out padded and is cut back to size, so
        nothing can be written after it (this is the end of the file)."""
        if not self._fill:
            return
        if not self.direct:
            self._drain(self._fill)
            return
        self._sealed = True
        padded = -(-self._fill // self.BLOCK) * self.BLOCK
        self._view[self._fill:padded] = bytes(padded - self._fill)
        self._drain(padded)
        os.ftruncate(self._fd, self.size)

    def fsync(self) -> None:
        self.flush()
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.flush()  # like any file: what was written is in the file once it is closed
        finally:
            self._release()

    def _release(self) -> None:
        try:
            self._view.release()
            self._buf.close()
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and self._fd >= 0:
            self._release()  # abandoned mid-write: do not bury the error under another write's
        else:
            self.close()


def _json_bytes(obj: Any) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


def _check_space(directory: Path, need: int, path: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < need:
        raise CheckpointError(
            f"not enough free space to write {path}: {free} bytes free in {directory}, {need} needed "
            "(checkpoint size before compression + checkpointing.min_free_bytes); free some space or lower "
            "checkpointing.max_checkpoints. Earlier checkpoints are intact."
        )


def _open_staging(spec: dict[str, Any]) -> tuple[mmap.mmap | None, int]:
    n = int(spec["data_bytes"])
    if n == 0:
        return None, 0
    try:
        fd = os.open(spec["staging"], os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"cannot open the staging buffer {spec['staging']}: {exc.strerror}; "
                              "the trainer that staged it is gone") from exc
    try:
        if os.fstat(fd).st_size < n:
            raise CheckpointError(f"staging buffer {spec['staging']} is smaller than the checkpoint ({n} bytes)")
        return mmap.mmap(fd, n, prot=mmap.PROT_READ), n
    finally:
        os.close(fd)


def commit_checkpoint(spec: dict[str, Any], registry_path: str | os.PathLike[str], *, threads: int = 0,
                      on_durable: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write the staged checkpoint ``spec`` to its final path durably, register it, move its run's best
    pointer, apply its run's retention. Returns the registry row. Raises CheckpointError (the registry
    marks it failed and no file appears under the final name), before writing anything if the final path
    belongs to another run (``spec["run_id"]``: another run registered it, or nobody did and a file is
    there); a run's own file is replaced (a re-save of the same step). ``on_durable(row)`` runs as soon as the file and its registry
    row are durable, before retention deletes older files (unlinking a gigabyte takes a while)."""
    path = Path(spec["path"])
    directory = path.parent
    check_level(spec["codec"], int(spec["level"]))
    key = key_from_spec(spec)
    tensors = tensors_of_spec(spec)
    try:
        make_dirs(directory)  # 0700, and an existing directory keeps its mode
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint directory {directory}: {exc.strerror}") from exc
    _check_space(directory, int(spec["data_bytes"]) + (1 << 20) + int(spec.get("min_free_bytes", 0)), str(path))
    tmp = directory / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with Registry(registry_path) as reg:
        reg.begin(spec, str(tmp))
        try:
            mm, n = _open_staging(spec)
            try:
                view = memoryview(mm) if mm is not None else memoryview(b"")
                try:
                    with DirectFile(tmp) as f:
                        size, digest = write_container(f, tensors, spec["metadata"], view[:n], spec["codec"],
                                                       int(spec["level"]), threads=threads, key=key, name=str(path))
                        f.fsync()
                finally:
                    view.release()
            finally:
                if mm is not None:
                    mm.close()
            os.replace(tmp, path)
            if spec.get("group"):  # access.group: the team may read it (0640, the folder 0750)
                share_with_group(path, spec["group"])
                share_with_group(directory, spec["group"])
            fsync_dir(directory)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            reg.fail(str(path), f"{type(exc).__name__}: {exc}")
            if isinstance(exc, OSError):
                hint = ("not enough space; free some or lower checkpointing.max_checkpoints"
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the directory")
                raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc} ({hint}); "
                                      "earlier checkpoints are intact") from exc
            raise
        row, doomed = reg.commit(spec, size, checksum_text(digest))
    if on_durable is not None:
        on_durable(row)
    for p in doomed:
        try:
            os.unlink(p)
            record("checkpoint.retention_delete", str(p), run=str(spec.get("run_id") or ""),
                   data_dir=None if Path(registry_path).name == STANDALONE_NAME else Path(registry_path).parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("checkpoint retention could not delete %s: %s", p, exc)
    if doomed:
        fsync_dir(directory)
    return row


def recover_interrupted(registry_path: str | os.PathLike[str]) -> list[str]:
    """Mark checkpoints whose writer died mid-write as failed and delete their temporary files; returns
    their final paths. (The final names never held partial data: only temporary files did.)"""
    out = []
    with Registry(registry_path) as reg:
        for row in reg.entries(None, ("writing",)):
            pid = int(row.get("writer_pid") or 0)
            if pid != os.getpid() and pid_alive(pid):
                continue  # another live process is writing it
            if row.get("tmp_path"):
                try:
                    os.unlink(row["tmp_path"])
                except OSError:
                    pass
            reg.mark_interrupted(row["path"])
            out.append(row["path"])
    return out
