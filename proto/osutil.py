"""Small OS helpers shared by the SDK and the agent."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive", "process_alive", "process_start_ticks", "fsync_dir"]


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


def process_start_ticks(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); 0 when unknown
    (no procfs, no such process). With the pid it names one process for good: a pid reused later by another
    process comes with another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def process_alive(pid: int, start_ticks: int) -> bool:
    """True while the process that had ``pid`` and started at ``start_ticks`` (see ``process_start_ticks``;
    0: unknown, the pid alone decides) still runs: a pid reused by another process counts as dead."""
    if not pid_alive(pid):
        return False
    if not start_ticks:
        return True
    now = process_start_ticks(pid)
    return now in (0, start_ticks)  # 0: it cannot be read (it exited this instant, or no procfs): trust kill()


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a file created or renamed in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
