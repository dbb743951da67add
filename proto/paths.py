"""Where the agent keeps its data, its socket, its rings and spill files (shared by SDK and agent)."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flightlog.proto.errors import ConfigError
from flightlog.proto.names import check_run_id
from flightlog.proto.osutil import PRIVATE_DIR_MODE, make_dirs

__all__ = ["AgentPaths", "resolve_paths", "default_data_dir", "DOORBELL_NAME", "ensure_private_dir",
           "ensure_ring_dir", "runtime_root", "private_dir_problem"]

log = logging.getLogger("flightlog")

#: The agent's doorbell socket (Unix datagram) inside the ring directory: a producer derives it from its
#: ring's folder, the agent from ``AgentPaths.doorbell`` (the ring scan only opens ``*.ring`` files).
DOORBELL_NAME = "doorbell"

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; leave room


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "flightlog"


@dataclass(frozen=True)
class AgentPaths:
    data_dir: Path
    socket: Path
    ring_dir: Path
    spill_dir: Path

    @property
    def wal_dir(self) -> Path:
        return self.data_dir / "wal"

    @property
    def store(self) -> Path:
        return self.data_dir / "flightlog.db"

    @property
    def lock(self) -> Path:
        return self.data_dir / "agent.lock"

    @property
    def doorbell(self) -> Path:
        return self.ring_dir / DOORBELL_NAME

    @property
    def log(self) -> Path:
        return self.data_dir / "agent.log"

    def run_dir(self, run_id: str) -> Path:
        """``<data dir>/runs/<run id>`` (artifacts, plots), for a valid run id only (a ValueError otherwise)."""
        return self.data_dir / "runs" / check_run_id(run_id)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _shm_base() -> Path:
    """Where per-user runtime directories go: ``FLIGHTLOG_SHM_DIR``, else /dev/shm, else the temp dir."""
    env = os.environ.get("FLIGHTLOG_SHM_DIR")
    if env:
        return Path(env).expanduser().absolute()
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def private_dir_problem(path: Path) -> str:
    """Why ``path`` cannot be this user's private directory ('' when it can, or does not exist yet).

    ``lstat``: a symlink is a problem in itself, whatever it points to.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


_warned: set[Path] = set()


def _first_private(preferred: Path, fallback: Path | None, what: str) -> Path:
    """``preferred`` if it is (or can become) ours alone, else ``fallback`` (with a warning, once)."""
    problem = private_dir_problem(preferred)
    if not problem:
        return preferred
    if fallback is None or private_dir_problem(fallback):
        raise ConfigError(f"{preferred} {problem}: flightlog will not keep its {what} there; remove it (as its "
                          "owner or root) or set FLIGHTLOG_AGENT_SOCKET to a path in a directory of yours")
    if preferred not in _warned:
        _warned.add(preferred)
        log.warning("flightlog: %s %s; keeping the %s in %s instead. Remove %s (as its owner or root) to use "
                    "it again", preferred, problem, what, fallback, preferred)
    return fallback


def runtime_root(socket: Path) -> Path:
    """The per-user directory for rings and checkpoint staging: ``<shm>/flightlog-<uid>`` when it is ours (or
    absent), else ``<socket's directory>/run`` — derived from the socket, which the SDK and the agent share, so
    both sides agree on the fallback without talking."""
    preferred = _shm_base() / f"flightlog-{os.getuid()}"
    return _first_private(preferred, socket.parent / "run", "rings")


def resolve_paths(data_dir: str | os.PathLike[str] | None = None, socket: str | os.PathLike[str] | None = None) -> AgentPaths:
    """Resolve the agent's paths. Precedence: environment, then the given (config) values, then defaults.

    ``FLIGHTLOG_DATA_DIR`` and ``FLIGHTLOG_AGENT_SOCKET`` win so a job script can point every process of a
    job at one node agent without editing configs. A per-user directory in /tmp or /dev/shm that someone else
    planted (a symlink, another owner) is never used: see ``runtime_root``.
    """
    data = Path(os.environ.get("FLIGHTLOG_DATA_DIR") or data_dir or default_data_dir()).expanduser().absolute()
    sock_text = os.environ.get("FLIGHTLOG_AGENT_SOCKET") or (str(socket) if socket else "")
    uid = os.getuid()
    if sock_text:
        sock = Path(sock_text).expanduser().absolute()
    else:
        sock = data / "agent.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            short = _first_private(Path(tempfile.gettempdir()) / f"flightlog-{uid}",
                                   Path(runtime) / "flightlog" if runtime else None, "agent socket")
            sock = short / f"{_short_hash(str(data))}.sock"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"agent socket path {sock} is {len(str(sock))} bytes, over the {_MAX_SOCKET_PATH}-byte limit of "
            "Unix sockets; set FLIGHTLOG_AGENT_SOCKET or agent.socket to a shorter path"
        )
    ring_dir = runtime_root(sock) / _short_hash(str(sock))
    return AgentPaths(data_dir=data, socket=sock, ring_dir=ring_dir, spill_dir=data / "spill")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700, missing parents 0700 too) or check the one there, without following a
    symlink; refuse (ConfigError, saying what to remove) one that is a symlink, not a directory, another
    user's, or writable by others. Never changes the mode of a directory it did not create."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc.strerror}; create it or choose another") from exc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link" if os.path.islink(path) else "not a directory"
            raise ConfigError(f"{path} is {what}: flightlog will not use it; remove it (as its owner or root) "
                              "or choose another directory") from exc
        raise ConfigError(f"cannot open directory {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): flightlog will not "
                          "use a directory another user controls; remove it (as its owner or root) or choose another")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"run `chmod go-w {path}` or choose another directory")
    return path


def ensure_ring_dir(paths: AgentPaths) -> Path:
    """The ring directory and the per-user directory above it, checked the same way by the SDK and the agent."""
    ensure_private_dir(paths.ring_dir.parent)
    return ensure_private_dir(paths.ring_dir)
