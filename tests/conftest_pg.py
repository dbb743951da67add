"""A private PostgreSQL server for the tests (one per session): the distribution's binaries, run as user nobody
(PostgreSQL refuses root) on 127.0.0.1 and a free port, with its own data and socket directories; and an
``mlflow server`` whose backend store is a database on it."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest_backends import MlflowServer, free_port

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
USER = "flightlog"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (.ci/run installs the distribution's `postgresql`)")
    return Path(found[-1]).parent


class Postgres:
    """``postgres`` in the foreground as nobody; ``uri(db)`` for clients (trust auth on 127.0.0.1 only)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.port = free_port()
        self.bin = _bin_dir()
        self.proc: subprocess.Popen[bytes] | None = None

    def uri(self, db: str) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 60.0) -> Postgres:
        os.chmod(self.root, 0o755)  # nobody walks into it; the data dir itself stays nobody's, 0700
        for d in (self.data, self.sockets):
            d.mkdir(mode=0o700)
            os.chown(d, NOBODY, NOBODY)
        subprocess.run([*AS_NOBODY, str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, cwd=self.root)
        self.log = open(self.root / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [*AS_NOBODY, str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.sockets), "-c", "fsync=off", "-c", "max_connections=100"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root,
        )
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", connect_timeout=2)
                break
            except psycopg2.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / 'postgres.log').read_text()[-3000:]
                    raise RuntimeError(f"postgres did not start: {log}") from None
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown (SIGTERM waits for clients)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "log", None) is not None:
            self.log.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="fl-pg-", dir="/tmp"))
    server = Postgres(root).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_pg(postgres: Postgres) -> Iterator[MlflowServer]:
    """An MLflow tracking server on PostgreSQL (its schema migrated at start), artifacts in a temp dir."""
    root = Path(tempfile.mkdtemp(prefix="fl-mlpg-", dir="/tmp"))
    server = MlflowServer(root, backend_uri=postgres.uri("mlflow")).start(timeout=180)
    yield server
    server.kill()  # its state is thrown away: no need to wait for a graceful stop of its job runners
    shutil.rmtree(root, ignore_errors=True)
