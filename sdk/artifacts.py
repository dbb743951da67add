"""Artifacts of a run: files copied into ``<data dir>/runs/<run id>/artifacts`` with a sha256, and the
Artifact event that hands them to the sinks."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from flightlog.proto.events import Artifact
from flightlog.validate import check_file_name

__all__ = ["copy_artifact", "save_git_diff", "sha256_tree"]

log = logging.getLogger("flightlog")


def copy_artifact(run_id: str, run_dir: Path, path: str | os.PathLike[str], name: str | None = None,
                  kind: str | None = None) -> tuple[Path, Artifact]:
    """Copy a file or directory into the run's directory (a second one of the same name replaces the
    first); returns the copy's path and its event."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"log_artifact: {src} does not exist")
    name = check_file_name(name or src.name)
    if os.sep in name:
        raise ValueError(f"artifact name must be a plain file name, got {name!r}")
    dest_dir = run_dir / "artifacts"
    dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest = dest_dir / name
    tmp = dest_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    if src.is_dir():
        shutil.copytree(src, tmp, symlinks=True)
    else:
        shutil.copyfile(src, tmp)
    checksum, size = sha256_tree(tmp)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest, Artifact(run_id, name, str(dest), time.time(), kind or ("dir" if src.is_dir() else "file"),
                          checksum, size)


def save_git_diff(run_id: str, run_dir: Path, diff: str) -> tuple[Path, Artifact] | None:
    """The uncommitted diff as the artifact ``git_diff.patch``; None (and a warning) if it cannot be written."""
    try:
        path = run_dir / "artifacts" / "git_diff.patch"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = diff.encode()
        path.write_bytes(data)
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
