"""Artifacts of a run: files copied into ``<data dir>/runs/<run id>/artifacts`` with a sha256, and the
Artifact event that hands them to the sinks."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

from flightlog.proto.events import Artifact
from flightlog.proto.names import check_file_name, child_path
from flightlog.proto.osutil import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, make_dirs

__all__ = ["copy_artifact", "save_git_diff", "sha256_tree"]

log = logging.getLogger("flightlog")


def copy_artifact(run_id: str, run_dir: Path, path: str | os.PathLike[str], name: str | None = None,
                  kind: str | None = None) -> tuple[Path, Artifact]:
    """Copy a file or directory into the run's directory (a second one of the same name replaces the
    first); returns the copy's path and its event. A copy's mode is the source's, without group and other
    bits: never wider than the source, and private like everything else flightlog writes."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"log_artifact: {src} does not exist")
    name = check_file_name(src.name if name is None else name, "log_artifact name")
    dest_dir = run_dir / "artifacts"
    make_dirs(dest_dir)
    dest = child_path(dest_dir, name, what="log_artifact name")
    tmp = dest_dir / f".{uuid.uuid4().hex[:8]}.tmp"  # not the name: a long name would overflow NAME_MAX
    try:
        if src.is_dir():
            shutil.copytree(src, tmp, symlinks=True, copy_function=_copy_private)
            _private_tree(tmp)
        else:
            _copy_private(src, tmp)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    checksum, size = sha256_tree(tmp)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest, Artifact(run_id, name, str(dest), time.time(), kind or ("dir" if src.is_dir() else "file"),
                          checksum, size)


def _copy_private(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a file's bytes (through a symlink) into a new file whose mode is the source's owner bits."""
    with open(src, "rb") as fin:
        mode = stat.S_IMODE(os.fstat(fin.fileno()).st_mode) & PRIVATE_DIR_MODE
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            os.fchmod(fd, mode)  # the umask may have taken bits the source has; never add any it lacks


def _private_tree(root: Path) -> None:
    """copytree gives directories their source's mode: keep only the owner's bits (they are ours, just made)."""
    for d, dirs, _files in os.walk(root):
        for p in [d, *(os.path.join(d, x) for x in dirs)]:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, stat.S_IMODE(st.st_mode) & PRIVATE_DIR_MODE)


def save_git_diff(run_id: str, run_dir: Path, diff: str) -> tuple[Path, Artifact] | None:
    """The uncommitted diff as the artifact ``git_diff.patch``; None (and a warning) if it cannot be written."""
    try:
        path = run_dir / "artifacts" / "git_diff.patch"
        make_dirs(path.parent)
        data = diff.encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        with open(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        log.warning("flightlog: could not save the uncommitted git diff: %s", exc)
        return None
    return path, Artifact(run_id, "git_diff.patch", str(path), time.time(), "git-diff",
                          "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def sha256_tree(path: Path) -> tuple[str, int]:
    """sha256 of a file, or of a directory's (relative path, file sha256) list; and the total size."""
    def file_hash(p: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n

    if not path.is_dir():
        digest, size = file_hash(path)
        return "sha256:" + digest, size
    outer = hashlib.sha256()
    total = 0
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.is_symlink()):
        digest, size = file_hash(p)
        outer.update(f"{p.relative_to(path).as_posix()}\0{digest}\n".encode())
        total += size
    return "sha256:" + outer.hexdigest(), total
