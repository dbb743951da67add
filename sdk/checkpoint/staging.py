"""Staging: reusable, pre-faulted shared-memory buffers that a save copies the tensors into — the only
part of a save that blocks training."""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flightlog.checkpoint.state import DTYPES_BY_NAME
from flightlog.proto.errors import CheckpointError
from flightlog.proto.osutil import pid_alive
from flightlog.proto.paths import ensure_private_dir, resolve_paths

__all__ = ["BOUNCE_BYTES", "StagingBuffer", "StagingPool", "default_staging_dir", "stage"]

BOUNCE_BYTES = 64 << 20


def default_staging_dir() -> Path:
    """``ckpt`` in the per-user runtime directory (``/dev/shm/flightlog-<uid>`` or its private fallback),
    which is checked here: the staging directory's own check does not look at its parent."""
    return ensure_private_dir(resolve_paths().ring_dir.parent) / "ckpt"


class StagingBuffer:
    """One shared-memory file, mapped once, pre-faulted, grown when a bigger state comes along."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.capacity = 0
        self.tensor: torch.Tensor | None = None

    def ensure(self, n: int) -> torch.Tensor:
        if n > self.capacity or self.tensor is None:
            size = max(-(-(n + n // 8) // (2 << 20)) * (2 << 20), 2 << 20)
            self.tensor = None
            # First creation exclusive, every open without following a symlink planted at the name.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if self.capacity else os.O_EXCL),
                         0o600)
            try:
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                self.capacity = 0
                raise CheckpointError(
                    f"cannot stage {n} bytes in {self.path.parent}: {exc.strerror}; enlarge /dev/shm (e.g. docker "
                    "--shm-size) or pass staging_dir= on a larger tmpfs"
                ) from exc
            os.close(fd)
            self.tensor = torch.from_file(str(self.path), shared=True, size=size, dtype=torch.uint8)
            self.tensor.zero_()  # touch every page now, so a save never page-faults
            self.capacity = size
        return self.tensor

    def close(self) -> None:
        self.tensor = None
        self.path.unlink(missing_ok=True)


class StagingPool:
    """At most ``n`` staged checkpoints in flight; ``acquire`` waits for a free buffer."""

    def __init__(self, directory: Path, n: int) -> None:
        # Only the staging directory itself must be private: its parent may be the user's (or /tmp), and a
        # directory flightlog did not create keeps its mode.
        ensure_private_dir(directory)
        self._sweep(directory)
        tag = f"ckpt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._free = [StagingBuffer(directory / f"{tag}-{i}.buf") for i in range(n)]
        self._all = list(self._free)
        self._cond = threading.Condition()

    @staticmethod
    def _sweep(directory: Path) -> None:
        """Remove buffers left by trainers that died (their pid is in the name)."""
        for p in directory.glob("ckpt-*.buf"):
            try:
                pid = int(p.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not pid_alive(pid):
                p.unlink(missing_ok=True)

    def acquire(self) -> StagingBuffer:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def release(self, buf: StagingBuffer) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        for b in self._all:
            b.close()


_COPY_PIECE = 16 << 20


def stage(staging: torch.Tensor, manifest: list[list[Any]], order: list[torch.Tensor],
           bounce: Callable[[], torch.Tensor], copiers: concurrent.futures.ThreadPoolExecutor | None) -> None:
    """Copy the tensors into the staging buffer: the only part of a save that blocks training.

    Contiguous CPU tensors are copied as raw byte ranges by ``memmove`` on ``copiers`` threads (ctypes
    releases the GIL), in pieces of up to 16 MiB, small tensors batched: a large glibc memcpy streams
    past the caches and beats ``Tensor.copy_`` by 15-20% here. Everything else goes through ``copy_``.
    """
    jobs: list[list[tuple[int, int, int]]] = [[]]
    filled = 0
    base = staging.data_ptr()
    with torch.no_grad():
        for (_name, dtype, shape, b, e), t in zip(manifest, order):
            if e == b:
                continue
            if t.device.type != "cpu" or not t.is_contiguous() or copiers is None:
                _copy_into(staging[b:e].view(DTYPES_BY_NAME[dtype]).view(shape), t, bounce)
                continue
            src = t.data_ptr()
            for off in range(0, e - b, _COPY_PIECE):
                n = min(_COPY_PIECE, e - b - off)
                jobs[-1].append((base + b + off, src + off, n))
                filled += n
                if filled >= _COPY_PIECE:
                    jobs.append([])
                    filled = 0
    if copiers is not None and jobs[0]:
        for fut in [copiers.submit(_memmove_all, j) for j in jobs if j]:
            fut.result()


def _memmove_all(job: list[tuple[int, int, int]]) -> None:
    for dst, src, n in job:
        ctypes.memmove(dst, src, n)


def _copy_into(dst: torch.Tensor, src: torch.Tensor, bounce: Callable[[], torch.Tensor]) -> None:
    """Copy ``src`` into ``dst`` (a view of the staging buffer); CUDA tensors go through pinned memory."""
    if src.device.type != "cuda":
        dst.copy_(src)
        return
    # Device-to-host at full speed needs page-locked memory: bounce through one reused pinned buffer.
    flat = src.detach().contiguous().reshape(-1).view(torch.uint8)
    out = dst.reshape(-1).view(torch.uint8)
    pinned = bounce()
    stream = torch.cuda.current_stream(src.device)
    for i in range(0, flat.numel(), pinned.numel()):
        k = min(pinned.numel(), flat.numel() - i)
        pinned[:k].copy_(flat[i:i + k], non_blocking=True)
        stream.synchronize()
        out[i:i + k].copy_(pinned[:k])
