"""Reading and verifying checkpoint files: checksum, trailer, frame index and safetensors bounds, then
one tensor (decompressing only its frames) or the whole data section (frames in parallel)."""
from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import stat
import struct
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from flightlog.proto.errors import CheckpointCorrupt, CheckpointError, CheckpointKeyError

from .codecs import check_frame, decompress_frame, decompress_into
from .crypto import ALGORITHM, OVERHEAD, SEALED_MAGIC, Envelope, Opener, decode_envelope, open_file_key
from .format import (
    CODECS,
    FOOTER,
    FOOTER_TENSOR,
    GZIP_MAGIC,
    GZIP_TAIL_LEN,
    MAX_HEADER,
    SKIPPABLE_MAGIC,
    ZSTD_MAGIC,
    Index,
    TensorInfo,
    checksum_text,
    decode_footer,
    decode_index,
    decode_stored_meta,
    frame_list,
    gzip_trailer_member,
    parse_header,
    validate_frames,
)
from .keys import KeyRing, KeyUse, default_keyring, notify_key_use

__all__ = ["CheckpointReader", "verify_file"]

_HASH_BLOCK = 64 << 20
_PIECE = 16 << 20  # in-place copies from an uncompressed file, per thread task
_CHECK_WINDOW = 1 << 20  # check_frames decodes through this much scratch, whatever a frame declares


def _open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file. O_NONBLOCK: opening a FIFO must
    not wait for a writer (it has no effect on a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint file") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open the checkpoint: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise CheckpointError(f"{path}: cannot read the checkpoint: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a checkpoint file; pass the path of a checkpoint file")
    return fd


class CheckpointReader:
    """An open, verified checkpoint file.

    Opening checks the trailer's CRC, the payload's xxh3-128 (``verify=True``), the agreement with
    ``expected_checksum`` (from the registry) and the safetensors header's bounds; any failure is
    CheckpointCorrupt naming the file.

    An encrypted file (see :mod:`.crypto`) is opened with the key its envelope names, from ``keys``
    (default: ``$FLIGHTLOG_CHECKPOINT_KEY``); none, or the wrong one, is CheckpointKeyError. With
    ``need_key=False`` and no key, the reader stays ``locked``: only the outer checks above are done.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True, expected_checksum: str | None = None,
                 keys: KeyRing | None = None, need_key: bool = True) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.frames_decompressed = 0
        self.encryption, self.key_id, self.locked = "none", "", False
        self.codec: str = ""
        self.frames: list[list[Any]] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._opener: Opener | None = None
        self._view: memoryview | None = None
        self._mm: mmap.mmap | None = None
        self._fd = _open_regular(self.path)
        try:
            self.size = os.fstat(self._fd).st_size
            self._mm = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ) if self.size else None
        except OSError as exc:
            self.close()
            raise CheckpointError(f"{self.path}: cannot read the checkpoint: {exc.strerror or exc}") from exc
        try:
            self._open(verify, expected_checksum, keys, need_key)
        except BaseException:
            self.close()
            raise

    # --- opening -------------------------------------------------------------------------------

    def _open(self, verify: bool, expected: str | None, keys: KeyRing | None, need_key: bool) -> None:
        name, buf = self.name, self._mm
        if buf is None or self.size < FOOTER.size + 8:
            raise CheckpointCorrupt(f"{name}: truncated ({self.size} bytes)")
        magic = buf[:4]
        if buf[:len(SEALED_MAGIC)] == SEALED_MAGIC:
            self._open_envelope(buf)  # the outer checks (below) come before any key is asked for
        elif magic == ZSTD_MAGIC:
            self._open_indexed(buf, self.size, "zstd")
        elif magic[:2] == GZIP_MAGIC:
            self._open_indexed(buf, self.size - GZIP_TAIL_LEN, "gzip")
        else:
            self._open_plain(buf)
        self.checksum = checksum_text(self.footer.digest)
        if expected and expected != self.checksum:
            raise CheckpointCorrupt(f"{name}: its footer says checksum {self.checksum}, the registry recorded "
                                    f"{expected}; the file was replaced or damaged")
        if verify:
            self._verify()
        if self.encryption != "none":
            self._unseal(keys, need_key)

    def _open_envelope(self, buf: mmap.mmap) -> None:
        """An encrypted file's envelope and trailer, checked without the key."""
        name = self.name
        self._env, self._env_raw = decode_envelope(buf, self.size, name)
        self.encryption, self.key_id = ALGORITHM, self._env.key_id
        raw = buf[self.size - FOOTER.size:]
        footer = decode_footer(raw, None, name)
        start = self.size - FOOTER.size - footer.index_len
        if footer.index_len > (16 << 20) or start != footer.payload_len or start < len(self._env_raw):
            raise CheckpointCorrupt(f"{name}: the trailer does not sit where the footer says (truncated or extended)")
        self.footer = decode_footer(raw, buf[start:self.size - FOOTER.size], name)

    def _unseal(self, keys: KeyRing | None, need_key: bool) -> None:
        """Check the key, then open the index and the safetensors header (frame 0)."""
        keys = default_keyring() if keys is None else keys
        if not need_key and (keys is None or keys.get(self.key_id) is None):
            self.locked = True
            return
        self._opener = _opener_for(self._env, self._env_raw, keys, self.name)
        assert self._mm is not None
        index, self.frames = _sealed_index(self._opener, self._mm, self.footer.payload_len, self.size, self.name)
        self.codec, self.total = index.codec, index.total
        self.header_len, self.metadata, tensors = parse_header(self._frame(0), self.name, index.total - index.header_len)
        if self.header_len != index.header_len:
            raise CheckpointCorrupt(f"{self.name}: header length disagrees with the index")
        self.tensors = {t.name: t for t in tensors}

    @property
    def _plain(self) -> bool:
        """An uncompressed, unencrypted file: its data section is the file's own bytes."""
        return self.codec == "none" and self._opener is None

    def _require_key(self) -> None:
        if self.locked:
            raise CheckpointKeyError(f"{self.name}: encrypted with key id {self.key_id!r}, and no key with that id "
                                     "is configured; set FLIGHTLOG_CHECKPOINT_KEY or checkpointing.key_file / "
                                     "key_command")

    def _hash(self, n: int) -> bytes:
        h = xxhash.xxh3_128()
        assert self._mm is not None
        view = memoryview(self._mm)
        try:
            for off in range(0, n, _HASH_BLOCK):
                h.update(view[off:min(n, off + _HASH_BLOCK)])
        finally:
            view.release()
        return h.digest()

    def _open_indexed(self, buf: mmap.mmap, end: int, container: str) -> None:
        name = self.name
        raw = buf[end - FOOTER.size:end]
        footer = decode_footer(raw, None, name)
        start = end - FOOTER.size - footer.index_len
        if footer.index_len > (16 << 20) or start < 0:
            raise CheckpointCorrupt(f"{name}: damaged trailer (index length {footer.index_len})")
        index_raw = buf[start:end - FOOTER.size]
        self.footer = decode_footer(raw, index_raw, name)
        if container == "zstd":
            frame_start = start - 8
            ok = frame_start == footer.payload_len and buf[frame_start:frame_start + 8] == struct.pack(
                "<II", SKIPPABLE_MAGIC, footer.index_len + FOOTER.size)
        else:
            frame_start = start - 16  # gzip header (10) + XLEN (2) + subfield id and length (4)
            member = gzip_trailer_member(bytes(footer.index_len + FOOTER.size))
            ok = (frame_start == footer.payload_len and buf[frame_start:start] == member[:16]
                  and buf[end:self.size] == member[-GZIP_TAIL_LEN:])
        if not ok or end + (GZIP_TAIL_LEN if container == "gzip" else 0) != self.size:
            raise CheckpointCorrupt(f"{name}: the trailer does not sit where the footer says (truncated or extended)")
        index = decode_index(index_raw, name)
        self.codec = index.codec
        self.frames = [frame_list(f) for f in index.frames]
        total, header_len = index.total, index.header_len
        if self.codec not in (("zstd", "zstd-bytegroup") if container == "zstd" else ("gzip",)):
            raise CheckpointCorrupt(f"{name}: codec {self.codec!r} does not match the container")
        validate_frames(self.frames, footer.payload_len, total, name, self.codec)
        if not self.frames or self.frames[0][3] != header_len:
            raise CheckpointCorrupt(f"{name}: the first frame is not the safetensors header")
        self.total = total
        head = self._frame(0)
        self.header_len, self.metadata, tensors = parse_header(head, name, total - header_len)
        if self.header_len != header_len:
            raise CheckpointCorrupt(f"{name}: header length disagrees with the index")
        self.tensors = {t.name: t for t in tensors}

    def _open_plain(self, buf: mmap.mmap) -> None:
        name = self.name
        self.codec = "none"
        (n,) = struct.unpack_from("<Q", buf)
        if n > MAX_HEADER:
            raise CheckpointCorrupt(f"{name}: safetensors header length {n} is out of bounds")
        if n > self.size - 8:
            raise CheckpointCorrupt(f"{name}: safetensors header length {n} exceeds the file ({self.size} bytes)")
        self.header_len, self.metadata, tensors = parse_header(buf[:8 + n], name, self.size - 8 - n)
        foot = tensors[-1] if tensors else None
        if foot is None or foot.name != FOOTER_TENSOR or foot.end - foot.begin != FOOTER.size:
            raise CheckpointCorrupt(
                f"{name}: no flightlog footer: the file was not written by flightlog or its header is damaged"
            )
        raw = buf[self.size - FOOTER.size:]
        self.footer = decode_footer(raw, b"", name)
        if self.footer.payload_len != self.size - FOOTER.size:
            raise CheckpointCorrupt(f"{name}: footer says {self.footer.payload_len} payload bytes, file has "
                                    f"{self.size - FOOTER.size} (truncated or extended)")
        self.tensors = {t.name: t for t in tensors[:-1]}
        self.total = self.size - FOOTER.size
        self.frames = [[0, self.total, 0, self.total]]

    # --- reading -------------------------------------------------------------------------------

    def _raw(self, f: list[Any]) -> memoryview:
        """The compressed bytes of frame ``f``, without copying them out of the mapping."""
        if self._view is None:
            assert self._mm is not None
            self._view = memoryview(self._mm)
        return self._view[f[0]:f[0] + f[1]]

    def _frame(self, i: int) -> bytes:
        f = self.frames[i]
        self.frames_decompressed += 1
        if self._opener is None:
            return decompress_frame(self.codec, self._raw(f), f, self.name)
        plain = self._opener.open(i, self._raw(f), f[0])
        return decompress_frame(self.codec, plain, [f[0], f[1] - OVERHEAD, *f[2:]], self.name)

    def _decode_into(self, i: int, f: list[Any], dest: memoryview, local: threading.local) -> None:
        """Frame ``i`` decoded into ``dest``; a sealed one is first opened (authenticated) in scratch, or,
        uncompressed, straight into ``dest`` (fresh memory, thrown away if it fails)."""
        if self._opener is None:
            decompress_into(self.codec, self._raw(f), f, self.name, dest)
            return
        n = f[1] - OVERHEAD
        if self.codec == "none":
            self._opener.open_into(i, self._raw(f), f[0], dest)
            return
        plain = _scratch(local, n, "plain")[0][:n]
        self._opener.open_into(i, self._raw(f), f[0], plain)
        decompress_into(self.codec, plain, [f[0], n, *f[2:]], self.name, dest)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the uncompressed safetensors stream, from the frames that overlap it."""
        self._require_key()
        if self._plain:
            assert self._mm is not None
            return self._mm[start:end]
        parts = []
        for i, f in enumerate(self.frames):
            if f[2] < end and f[2] + f[3] > start:
                blob = self._frame(i)
                parts.append(blob[max(0, start - f[2]):end - f[2]])
        return b"".join(parts)

    def tensor_bytes(self, name: str) -> bytes:
        self._require_key()
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.name} has no tensor {name!r}")
        return self.read_range(self.header_len + t.begin, self.header_len + t.end)

    def read_data(self, out: memoryview | None = None, *, threads: int = 0, verify: bool = False,
                  in_place: Mapping[str, int] | None = None) -> memoryview:
        """The whole data section, frames decompressed in parallel straight into ``out`` (a writable buffer
        of exactly the data's size; by default fresh anonymous memory, returned as a writable view).

        ``in_place`` maps tensor names to the address of writable memory holding exactly that tensor's
        bytes (a model's parameters, an optimizer's state): those tensors are loaded there instead, the
        way torch.distributed.checkpoint loads in place, and their part of ``out`` is never touched (nor,
        being fresh memory, ever faulted in). A frame that feeds such memory is decoded into scratch first,
        so nothing lands in it before the frame's own checksum has passed.

        With ``verify`` the file's checksum is computed alongside the decompression (open the reader with
        ``verify=False`` to use this), so a cold file is read from disk once; a mismatch raises
        CheckpointCorrupt once everything is done, and ``out`` must then be thrown away. An uncompressed
        file is verified first, then copied in place where asked, and with no ``out`` mapped copy-on-write
        the way safetensors maps it.
        """
        self._require_key()
        n = self.total - self.header_len
        assert self._mm is not None
        spans = sorted((t.begin, t.end, addr) for name, addr in (in_place or {}).items()
                       if (t := self.tensors.get(name)) is not None and t.end > t.begin)
        if self._plain:
            if verify:
                self._verify()
            data = self._private_view()
            if spans:
                src = _address(data)
                pieces = [(addr + off, src + b + off, min(_PIECE, e - b - off))
                          for b, e, addr in spans for off in range(0, e - b, _PIECE)]
                with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
                    list(pool.map(lambda p: ctypes.memmove(*p), pieces))
            if out is None:
                return data
            out[:] = data
            return out
        if out is None:
            out = memoryview(_anonymous(n, self.name)) if n else memoryview(bytearray())
        elif len(out) != n:
            raise CheckpointError(f"{self.name}: read_data needs a {n}-byte buffer, got {len(out)}")
        self._mm.madvise(mmap.MADV_WILLNEED)  # a cold file: start reading all of it now
        base, out_addr = self.header_len, _address(out) if n else 0
        begins = [b for b, _, _ in spans]
        local = threading.local()

        def one(i: int) -> None:
            f = self.frames[i]
            self.frames_decompressed += 1
            lo, hi = f[2] - base, f[2] - base + f[3]
            k = max(0, bisect.bisect_right(begins, lo) - 1)
            hits = [s for s in spans[k:bisect.bisect_left(begins, hi)] if s[1] > lo]
            if not hits:
                self._decode_into(i, f, out[lo:hi], local)
                return
            scratch = _scratch(local, f[3])
            self._decode_into(i, f, scratch[0][:f[3]], local)
            pos = lo
            for b, e, addr in hits:  # the gaps go to ``out``, the rest to its tensors
                if b > pos:
                    ctypes.memmove(out_addr + pos, scratch[1] + pos - lo, b - pos)
                a, z = max(b, lo), min(e, hi)
                ctypes.memmove(addr + a - b, scratch[1] + a - lo, z - a)
                pos = z
            if pos < hi:
                ctypes.memmove(out_addr + pos, scratch[1] + pos - lo, hi - pos)

        # A sealed file is authenticated by every frame's GCM tag and its sealed index, more strongly than by
        # the xxh3; the checksum pass runs anyway: it reads the file front to back ahead of the decoders
        # (without it a cold file is faulted in by their scattered reads, 1.9x slower here), on a core of
        # its own and outside the GIL, at a tenth of the cost of the decryption.
        self._run(one, verify, threads)
        return out

    def check_frames(self, threads: int = 0) -> None:
        """Decompress every frame through a small scratch window and drop it: a deep check that keeps
        nothing, in bounded memory whatever size a frame declares."""
        self._require_key()
        if self._plain:
            return
        local = threading.local()

        def one(i: int) -> None:
            f = self.frames[i]
            window = _scratch(local, _CHECK_WINDOW)[0]
            if self._opener is None:
                check_frame(self.codec, self._raw(f), f, self.name, window)
                return
            n = f[1] - OVERHEAD
            plain = _scratch(local, n, "plain")[0][:n]
            self._opener.open_into(i, self._raw(f), f[0], plain)
            if self.codec != "none":
                check_frame(self.codec, plain, [f[0], n, *f[2:]], self.name, window)

        self._run(one, False, threads)

    def _run(self, one: Any, verify: bool, threads: int = 0) -> None:
        """Run ``one(i)`` for every data frame on a thread pool (plus the checksum, with ``verify``)."""
        frames = range(1, len(self.frames))
        workers = threads or os.cpu_count() or 1
        if workers == 1 and not verify:
            for i in frames:
                one(i)
            return
        with ThreadPoolExecutor(workers + verify, thread_name_prefix="flightlog-unzstd") as pool:
            futures = [pool.submit(self._verify)] if verify else []
            futures += [pool.submit(one, i) for i in frames]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    def _verify(self) -> None:
        actual = self._hash(self.footer.payload_len)
        if actual != self.footer.digest:
            raise CheckpointCorrupt(f"{self.name}: checksum mismatch (recorded {self.checksum}, content hashes to "
                                    f"{checksum_text(actual)}): the file is damaged")

    def _private_view(self) -> memoryview:
        """The data section of an uncompressed file, mapped privately and writably (copy-on-write, as
        safetensors maps it; writable also lets ctypes take its address)."""
        mm = mmap.mmap(self._fd, self.total, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return memoryview(mm)[self.header_len:self.total]

    def export(self, dest: str | os.PathLike[str], names: list[str] | None = None,
               metadata: dict[str, str] | None = None) -> None:
        """Write a plain safetensors file (all tensors, or ``names``) with this metadata (default: the same)."""
        from .format import build_header

        self._require_key()
        keep = [self.tensors[n] for n in sorted(self.tensors, key=lambda n: self.tensors[n].begin)
                if names is None or n in names]
        pos, out_infos = 0, []
        for t in keep:
            out_infos.append(TensorInfo(t.name, t.dtype, t.shape, pos, pos + t.end - t.begin))
            pos += t.end - t.begin
        tmp = Path(f"{dest}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(build_header(out_infos, self.metadata if metadata is None else metadata))
            if names is None and not self._plain:
                for i in range(1, len(self.frames)):
                    f.write(self._frame(i))
            else:
                for t in keep:
                    f.write(self.tensor_bytes(t.name))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)

    def close(self) -> None:
        if getattr(self, "_view", None) is not None:
            self._view.release()  # type: ignore[union-attr]
            self._view = None
        if getattr(self, "_mm", None) is not None:
            try:
                self._mm.close()  # type: ignore[union-attr]
            except BufferError:  # a slice is still referenced (an exception's traceback): unmapped when freed
                pass
            self._mm = None
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _opener_for(env: Envelope, env_raw: bytes, keys: KeyRing | None, name: str) -> Opener:
    """The file's key from ``keys``, checked (CheckpointKeyError, and the key-use hook hears either way)."""
    key = open_file_key(env, keys, name)
    try:
        opener = Opener(env, env_raw, key, name)
    except CheckpointKeyError:
        notify_key_use(KeyUse("open", env.key_id, name, "wrong key"))
        raise
    notify_key_use(KeyUse("open", env.key_id, name))
    return opener


def _sealed_index(opener: Opener, mm: mmap.mmap, payload_len: int, size: int, name: str
                  ) -> tuple[Index, list[list[Any]]]:
    """The sealed index (between the payload and the footer), opened and checked against the payload."""
    index = decode_index(opener.open_index(mm[payload_len:size - FOOTER.size]), name)
    if index.codec not in CODECS:
        raise CheckpointCorrupt(f"{name}: unknown codec {index.codec!r} in the sealed index")
    frames = [frame_list(f) for f in index.frames]
    validate_frames(frames, payload_len, index.total, name, index.codec, start=len(opener.envelope),
                    overhead=OVERHEAD)
    if not frames or frames[0][3] != index.header_len:
        raise CheckpointCorrupt(f"{name}: the first frame is not the safetensors header")
    return index, frames


def _address(buf: Any) -> int:
    """The address of a writable buffer's first byte (kept valid by whoever holds ``buf``)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _anonymous(n: int, name: str) -> mmap.mmap:
    """Fresh anonymous memory for ``n`` bytes (faulted in only where written)."""
    try:
        return mmap.mmap(-1, n)
    except (OSError, OverflowError) as exc:
        raise CheckpointError(f"{name}: cannot map {n} bytes for its data: {exc}; the file declares more than "
                              "this machine can hold") from exc


def _scratch(local: threading.local, n: int, which: str = "scratch") -> tuple[memoryview, int]:
    """A per-thread scratch buffer (one per ``which``) of at least ``n`` bytes and its address."""
    have = getattr(local, which, None)
    if have is None or len(have[0]) < n:
        buf = bytearray(max(n, 1))
        have = (memoryview(buf), _address(buf))
        setattr(local, which, have)
    return have


def verify_file(path: str | os.PathLike[str], expected_checksum: str | None = None, *, deep: bool = True,
                keys: KeyRing | None = None) -> str:
    """Verify ``path`` (checksum, trailer, bounds, the flightlog metadata's shape; ``deep`` also decompresses
    every frame); returns its checksum or raises CheckpointCorrupt/CheckpointError. An encrypted file
    verifies its outer checksum without the key unless ``deep``, which opens every frame with it
    (CheckpointKeyError without)."""
    with CheckpointReader(path, expected_checksum=expected_checksum, keys=keys, need_key=deep) as r:
        if r.locked:
            return r.checksum
        if "flightlog" in r.metadata:
            decode_stored_meta(r.metadata["flightlog"], r.name, r.tensors)
        if deep:
            r.check_frames()
        return r.checksum
