"""Shared fixtures: an isolated agent (own data dir, socket, ring dir) per test, started as a real process."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flightlog.proto.paths import AgentPaths, resolve_paths

# Every `mlflow server` the tests start (they inherit this): no GenAI job runner and its three huey worker
# processes, which cost a loaded 2-core machine tens of seconds per server start and are never used here.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


class AgentProcess:
    """A real `python -m flightlog.agent` process on an isolated data dir and socket."""

    def __init__(self, paths: AgentPaths, extra_args: list[str] | None = None) -> None:
        self.paths = paths
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> AgentProcess:
        if getattr(self, "log", None) is not None:
            self.log.close()
        self.log = open(self.paths.data_dir / "agent-test.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flightlog.agent", "--data-dir", str(self.paths.data_dir),
             "--socket", str(self.paths.socket), *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        from flightlog.proto.control import connect

        while time.monotonic() < deadline:
            client = connect(self.paths, timeout=1.0)
            if client is not None:
                client.close()
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.read_log()}")
            time.sleep(0.05)
        raise RuntimeError(f"agent did not start: {self.read_log()}")

    def read_log(self) -> str:
        try:
            return (self.paths.data_dir / "agent-test.log").read_text()
        except OSError:
            return ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test ends with the environment it started with: `flightlog.agent.cli.main` called in-process
    exports --data-dir/--socket (for the children a command starts), which must not leak into later tests."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture
def agent_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentPaths]:
    """Isolated paths: the env vars point every tracker in this test (and its children) at them."""
    sock_dir = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    data = tmp_path / "agent-data"
    monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(data))
    monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(sock_dir / "a.sock"))
    paths = resolve_paths()
    data.mkdir(mode=0o700)
    yield paths
    shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(paths.ring_dir, ignore_errors=True)


@pytest.fixture
def agent(agent_paths: AgentPaths) -> Iterator[AgentProcess]:
    proc = AgentProcess(agent_paths).start()
    yield proc
    proc.stop()


@pytest.fixture
def base_config(tmp_path: Path) -> dict:
    """A run config that needs no backend but the local store, and never starts a sidecar by itself."""
    return {
        "tracking": {"use_tensorboard": False, "tensorboard_log_dir": str(tmp_path / "tb")},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "agent": {"autostart": False},
    }


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def env_for_child(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    return env


from conftest_pg import mlflow_pg, postgres  # noqa: E402, F401  (the session PostgreSQL + MLflow fixtures)
