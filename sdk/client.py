"""The SDK's side of the control socket: find the agent, or start one as a detached sidecar."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from flightlog.proto.control import AGENT_LOCKED_EXIT, AgentClient, connect
from flightlog.proto.errors import AgentUnavailable
from flightlog.proto.paths import AgentPaths, ensure_private_dir

__all__ = ["AgentClient", "connect", "start_sidecar", "connect_or_start"]

log = logging.getLogger("flightlog")


#: Sidecars this process started; kept referenced so Popen never warns about a running child.
_sidecars: list[subprocess.Popen[bytes]] = []


def start_sidecar(paths: AgentPaths, settings: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start ``python -m flightlog.agent`` detached: it outlives the trainer until it has drained."""
    ensure_private_dir(paths.data_dir)
    ensure_private_dir(paths.socket.parent)
    logfile = open(os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab")
    try:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "flightlog.agent", "--sidecar",
                "--data-dir", str(paths.data_dir), "--socket", str(paths.socket),
                "--settings-json", json.dumps(settings),
            ],
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    finally:
        logfile.close()
    _sidecars.append(proc)
    return proc


def connect_or_start(paths: AgentPaths, settings: dict[str, Any], *, autostart: bool, timeout: float) -> AgentClient | None:
    client = connect(paths)
    if client is not None or not autostart:
        return client
    proc = start_sidecar(paths, settings)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        client = connect(paths)
        if client is not None:
            return client
        code = proc.poll()
        if code is not None and code != AGENT_LOCKED_EXIT:  # another agent holds the lock: connect to it
            raise AgentUnavailable(
                f"the flightlog agent exited with code {code} at start; see {paths.log}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise AgentUnavailable(
        f"no flightlog agent answered on {paths.socket} within {timeout:.0f} s; see {paths.log}"
    )
