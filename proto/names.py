"""Every user string that reaches a file path goes through here: validated (run ids, artifact names) or
encoded (run names, metric keys, MLflow artifact paths), so that no name can leave its root directory."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_ID_MAX",
    "NAME_BYTES_MAX",
    "check_run_id",
    "check_file_name",
    "safe_component",
    "safe_relpath",
    "child_path",
    "node_name",
]

#: A run id names files (``<ring dir>/<run id>-<pid>-<tag>.ring``, spill files, ``<data dir>/runs/<run id>``);
#: 128 characters leave room for those suffixes well inside the 255 bytes a file name may have.
RUN_ID_MAX = 128
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

#: The longest file name Linux file systems take, in bytes (NAME_MAX).
NAME_BYTES_MAX = 255

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 60 else f"{text[:40]!r}... ({len(text)} characters)"


def check_run_id(run_id: Any, what: str = "run_id") -> str:
    """``run_id`` if it can name the run's files, else a ValueError that names ``what`` and says the rule."""
    if not isinstance(run_id, str):
        raise TypeError(f"{what} must be a str, got {type(run_id).__name__}")
    if len(run_id) > RUN_ID_MAX or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"{what} {_shown(run_id)} is not usable: it names the run's ring, spill and artifact files, so it "
            f"must be 1 to {RUN_ID_MAX} characters of letters, digits, '.', '_' and '-', starting with a letter "
            "or digit"
        )
    return run_id


def check_file_name(name: Any, what: str = "artifact name") -> str:
    """``name`` if it is a plain file name (one path component), else a ValueError that names ``what``."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    problem = ""
    if not name or name in (".", ".."):
        problem = "it is empty, '.' or '..'"
    elif "/" in name or "\0" in name or (os.altsep and os.altsep in name):
        problem = "it contains '/' or a NUL character"
    else:
        try:
            size = len(name.encode())
        except UnicodeEncodeError:
            problem = "it is not valid Unicode (a lone surrogate)"
        else:
            if size > NAME_BYTES_MAX:
                problem = f"it is {size} bytes long, over the {NAME_BYTES_MAX} a file name may have"
    if problem:
        raise ValueError(f"{what} {_shown(name)} must be a plain file name: {problem}; pass another name")
    return name


def safe_component(text: str, limit: int = 100, default: str = "run") -> str:
    """A file-name-safe form of any string (a run name, a key): runs of other characters become '_', leading
    and trailing dots and underscores go, so it is never empty (``default``), '.', '..' or hidden."""
    return _UNSAFE.sub("_", text).strip("._")[:limit] or default


def safe_relpath(text: str, limit: int = 100) -> str:
    """A relative '/'-separated path from any string (an MLflow artifact path): each component encoded by
    ``safe_component``, empty and dot-only components dropped; '' when nothing is left."""
    parts = (safe_component(p, limit, "") for p in text.split("/"))
    return "/".join(p for p in parts if p)


def child_path(root: str | os.PathLike[str], *parts: str, what: str = "name") -> Path:
    """``root/part/...``, refused with a ValueError naming ``what`` when the result (symlinks resolved) is
    not inside ``root``: the last check before a derived name is used as a path."""
    base = Path(root)
    path = base.joinpath(*parts)
    real_root = os.path.realpath(base)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ValueError(f"{what} {_shown('/'.join(parts))} would leave {base} (it resolves to {real}); "
                         "pass a plain name")
    return path


def node_name(env: Any = None) -> str:
    """This node's name in metric keys (``system/<node>/...``) and MLflow tags: ``FLIGHTLOG_NODE`` where set
    (two agents on one machine standing for two nodes, or a host name that says nothing), else the host name;
    encoded by ``safe_component`` so it is one key component."""
    import socket

    raw = (os.environ if env is None else env).get("FLIGHTLOG_NODE") or socket.gethostname()
    return safe_component(str(raw), 64, "node")
