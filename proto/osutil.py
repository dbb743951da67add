"""Small OS helpers shared by the SDK and the agent."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive", "fsync_dir"]


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (a dead child nobody reaped yet)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill()
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a file created or renamed in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
