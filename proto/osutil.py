"""Small OS helpers shared by the SDK and the agent."""
from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "PRIVATE_UMASK", "make_dirs", "restrict_umask", "pid_alive",
           "process_alive", "process_start_ticks", "fsync_dir", "share_with_group", "GROUP_DIR_MODE",
           "GROUP_FILE_MODE"]

#: What flightlog creates: directories 0700, files 0600 (group sharing is for a later, explicit setting).
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: What ``access.group`` shares: the group may read (and enter), never write.
GROUP_DIR_MODE = 0o750
GROUP_FILE_MODE = 0o640
#: The umask a process that runs backend libraries (mlflow, wandb, sqlite) gets, so their files are private too.
PRIVATE_UMASK = 0o077


def make_dirs(path: str | os.PathLike[str], mode: int = PRIVATE_DIR_MODE) -> list[Path]:
    """``mkdir -p`` that gives every directory it creates ``mode`` (``Path.mkdir(parents=True)`` gives the
    parents the umask's default) and never touches one that exists; returns those it created, outermost first."""
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, not ours to chmod
        created.append(d)
    return created


def share_with_group(path: str | os.PathLike[str], group: str) -> None:
    """Give ``path`` (a file or folder of ours, not followed if a symlink) to ``group``, readable by it:
    files 0640, folders 0750 (``access.group``). A group that does not exist is a ConfigError naming it."""
    import grp

    from flightlog.proto.errors import ConfigError

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"access.group: no group {group!r} on this host; create it or fix the setting") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, GROUP_DIR_MODE if stat.S_ISDIR(st.st_mode) else GROUP_FILE_MODE)


def restrict_umask() -> int:
    """Add ``PRIVATE_UMASK`` to the process umask (never loosen it); returns the umask now in force.

    Set first and or-ed after, so no thread ever runs under a looser umask than before (reading the umask
    needs setting it: ``os.umask(0)`` would open a window of world-writable files).
    """
    old = os.umask(PRIVATE_UMASK)
    new = old | PRIVATE_UMASK
    if new != PRIVATE_UMASK:
        os.umask(new)
    return new


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
