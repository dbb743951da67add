"""Where the agent keeps its data, its socket, its rings and spill files (shared by SDK and agent)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flightlog.proto.errors import ConfigError

__all__ = ["AgentPaths", "resolve_paths", "default_data_dir", "DOORBELL_NAME", "ensure_private_dir"]

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


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def resolve_paths(data_dir: str | os.PathLike[str] | None = None, socket: str | os.PathLike[str] | None = None) -> AgentPaths:
    """Resolve the agent's paths. Precedence: environment, then the given (config) values, then defaults.

    ``FLIGHTLOG_DATA_DIR`` and ``FLIGHTLOG_AGENT_SOCKET`` win so a job script can point every process of a
    job at one node agent without editing configs.
    """
    data = Path(os.environ.get("FLIGHTLOG_DATA_DIR") or data_dir or default_data_dir()).expanduser().absolute()
    sock_text = os.environ.get("FLIGHTLOG_AGENT_SOCKET") or (str(socket) if socket else "")
    uid = os.getuid()
    if sock_text:
        sock = Path(sock_text).expanduser().absolute()
    else:
        sock = data / "agent.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            sock = Path(tempfile.gettempdir()) / f"flightlog-{uid}" / f"{_short_hash(str(data))}.sock"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"agent socket path {sock} is {len(str(sock))} bytes, over the {_MAX_SOCKET_PATH}-byte limit of "
            "Unix sockets; set FLIGHTLOG_AGENT_SOCKET or agent.socket to a shorter path"
        )
    shm = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    ring_dir = shm / f"flightlog-{uid}" / _short_hash(str(sock))
    return AgentPaths(data_dir=data, socket=sock, ring_dir=ring_dir, spill_dir=data / "spill")


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) and refuse one that another user owns or others can write."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to you; choose another directory")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
