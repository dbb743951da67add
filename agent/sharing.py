"""``access.group`` for the run data the agent writes: the data directory (entered, not listed for writing),
the local store (``flightlog.db`` and its ``-wal``/``-shm``), the run folders (``runs/<id>/plots``...) and the
TensorBoard folders its sink creates become group-readable (files 0640, folders 0750, that group). Without
the setting nothing changes: all of it stays 0600/0700.

Every writer creates its files private (0600, ``O_EXCL``/``O_NOFOLLOW``), and this loop widens them to the
group after the fact, every ``period`` seconds: a new file is private for a moment, never more open than
asked. The data directory gets the setgid bit, so that files SQLite creates there (``-wal``, ``-shm``) are
the group's from the start; their mode is the database file's (SQLite copies it)."""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio

from flightlog.proto.errors import ConfigError, FlightlogError
from flightlog.proto.osutil import GROUP_DIR_MODE, GROUP_FILE_MODE, share_with_group
from flightlog.proto.paths import AgentPaths

from .grid import sleep_on_grid

__all__ = ["GroupSharing", "SHARED_ROOT_NAMES"]

log = logging.getLogger("flightlog.agent")

#: What the group may read in the data directory; the WAL, the audit log and its key, the run owners, the
#: lock and the quarantine stay private (0600/0700).
SHARED_ROOT_NAMES = ("flightlog.db", "flightlog.db-wal", "flightlog.db-shm", "runs")
_MAX_DEPTH = 4  # runs/<id>/plots/<png>: deeper is no folder flightlog makes


class GroupSharing:
    """The sweep; ``extra_roots`` names the folders outside the data directory to share (the TensorBoard
    sink's), asked for on each sweep."""

    def __init__(self, paths: AgentPaths, group: str | None,
                 extra_roots: Callable[[], Iterable[Path]] = lambda: ()) -> None:
        self.paths = paths
        self.group = group
        self.extra_roots = extra_roots
        self._gid = -1

    def _wanted(self, st: os.stat_result) -> bool:
        """True when ``st`` is not yet the group's, at the shared mode."""
        mode = GROUP_DIR_MODE if stat.S_ISDIR(st.st_mode) else GROUP_FILE_MODE
        return st.st_gid != self._gid or stat.S_IMODE(st.st_mode) & 0o777 != mode

    def _share(self, path: Path) -> None:
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
                return  # not ours to hand out (a symlink planted there, another user's file)
            if self._wanted(st):
                share_with_group(path, self.group or "")
        except FileNotFoundError:
            pass  # gone meanwhile (a -wal after the last connection closed)

    def _tree(self, root: Path, depth: int) -> None:
        self._share(root)
        if depth <= 0 or not root.is_dir() or root.is_symlink():
            return
        try:
            with os.scandir(root) as it:
                children = [Path(e.path) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return
        for child in children:
            self._tree(child, depth - 1)

    def sweep(self) -> None:
        """One pass; a ConfigError when the group does not exist."""
        if self.group is None:
            return
        import grp

        try:
            self._gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ConfigError(f"access.group: no group {self.group!r} on this host; create it or fix the "
                              "setting") from None
        data = self.paths.data_dir
        self._share(data)
        st = os.lstat(data)
        if not st.st_mode & stat.S_ISGID and st.st_uid == os.geteuid():
            os.chmod(data, GROUP_DIR_MODE | stat.S_ISGID)  # SQLite's -wal and -shm are the group's from birth
        for name in SHARED_ROOT_NAMES:
            self._tree(data / name, _MAX_DEPTH)
        for root in self.extra_roots():
            self._tree(Path(root), 2)

    def final_sweep(self) -> None:
        """The last pass, as the agent stops; a failure is logged (the agent is stopping anyway)."""
        try:
            self.sweep()
        except (OSError, FlightlogError) as exc:
            log.warning("access.group %s: cannot share the run data: %s", self.group, exc)

    async def run(self, period: float = 2.0) -> None:
        """Sweep every ``period`` seconds, and once more as the agent stops (what the sinks wrote last)."""
        if self.group is None:
            return
        try:
            while True:
                try:
                    await anyio.to_thread.run_sync(self.sweep)
                except (OSError, FlightlogError) as exc:
                    log.warning("access.group %s: cannot share the run data: %s; trying again in %.0f s",
                                self.group, exc, period)
                await sleep_on_grid(period)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.final_sweep)
