"""Credentials (issue 13, item 5): ``flightlog secrets`` keeps them in a 0600 store (the file store here: CI has
no keyring backend), configs reference them as ``${secret:NAME}``/``${env:NAME}``, and the resolved value
reaches only the backend: a real ``mlflow server --app-name basic-auth`` gets it, nothing on disk or on any
command line holds it, and wrong credentials park only the MLflow sink, with "401" in ``flightlog status``."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from conftest_backends import MlflowServer, run_events, tb_scalars, write_wal
from hypothesis import given, settings
from hypothesis import strategies as st

from flightlog.agent.cli import main
from flightlog.capture import redact
from flightlog.proto.config import config_to_dict, load_config
from flightlog.proto.errors import ConfigError, SecretError
from flightlog.proto.secrets import FileSecretStore, resolve, secret_store

PASSWORD = "pw-Zq8#Lk2!vR7-flightlog-test"
WRONG = "not-the-password-0xBADBADBAD"


@pytest.fixture(autouse=True)
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "config-home"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("FLIGHTLOG_SECRETS_BACKEND", raising=False)
    return home


def set_secret(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(value + "\n"))
    return main(["secrets", "set", name])


# --- the store -----------------------------------------------------------------------------------


def test_set_ls_rm_through_stdin_into_a_private_file(config_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert type(secret_store()) is FileSecretStore  # no keyring backend here, as in CI
    assert set_secret("mlflow_pw", PASSWORD, monkeypatch) == 0
    assert set_secret("other", "x", monkeypatch) == 0
    path = config_home / "flightlog" / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    capsys.readouterr()
    assert main(["secrets", "ls"]) == 0
    out = capsys.readouterr().out
    assert out.split() == ["mlflow_pw", "other"] and PASSWORD not in out
    assert resolve("${secret:mlflow_pw}") == PASSWORD
    assert main(["secrets", "rm", "other"]) == 0 and main(["secrets", "rm", "other"]) == 1
    with pytest.raises(SystemExit):  # a value on the command line is not even accepted
        main(["secrets", "set", "x", PASSWORD])


def test_a_store_others_can_read_is_refused(config_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_secret("a", "b", monkeypatch)
    path = config_home / "flightlog" / "secrets.json"
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        resolve("${secret:a}")
    path.unlink()
    path.symlink_to(config_home / "elsewhere")
    with pytest.raises(SecretError, match="symbolic link"):
        FileSecretStore().set("a", "b")
    assert not (config_home / "elsewhere").exists()


# --- references in configs ----------------------------------------------------------------------


def test_references_in_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    cfg = load_config({"checkpointing": {"checkpoint_dir": "${env:SCRATCH}/ckpt"},
                       "tracking": {"mlflow_password": "${secret:pw}", "mlflow_username": "alice",
                                    "wandb_api_key": "${env:MY_WANDB_KEY}"}})
    assert cfg.checkpointing.checkpoint_dir == f"{tmp_path}/ckpt"
    # Credential keys keep the reference: it, not the value, travels with the run (and survives redaction).
    assert cfg.tracking.mlflow_password == "${secret:pw}" and cfg.tracking.wandb_api_key == "${env:MY_WANDB_KEY}"
    sent = redact(config_to_dict(cfg))
    assert sent["tracking"]["mlflow_password"] == "${secret:pw}"
    with pytest.raises(ConfigError, match="written out.*secrets set"):
        load_config({"tracking": {"mlflow_password": PASSWORD}})
    with pytest.raises(ConfigError, match="only allowed in the credential keys"):
        load_config({"tracking": {"mlflow_tracking_uri": "${secret:pw}"}})
    with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
        load_config({"checkpointing": {"checkpoint_dir": "${env:NOPE_NOT_SET}"}})
    with pytest.raises(SecretError, match="flightlog secrets set pw"):
        resolve("${secret:pw}")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_resolve_only_raises_secret_error(text: str) -> None:
    try:
        resolve(text, env={"A": "x"}, store=FileSecretStore(Path("/nonexistent/secrets.json")))
    except SecretError:
        pass


# --- a real MLflow server with basic auth -------------------------------------------------------------


class AuthMlflowServer(MlflowServer):
    """``mlflow server --app-name basic-auth``: its own auth DB beside (not in) the artifact root; the admin's
    password from the environment (MLflow's bootstrap), never on the command line."""

    def start(self, timeout: float = 120.0, *, app: list[str] | None = None,
              env: dict[str, str] | None = None) -> AuthMlflowServer:
        ini = self.root / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.root}/auth.db\n"
                       "admin_username = admin\nauthorization_function = "
                       "mlflow.server.auth:authenticate_request_basic_auth\n"
                       "auth_cache_ttl_seconds = 300\n")  # one PBKDF2 check per (user, password), not per request
        env = {**(env or os.environ), "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
        super().start(timeout, app=["--app-name", "basic-auth"], env=env)
        return self


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMlflowServer]:
    server = AuthMlflowServer(tmp_path_factory.mktemp("mlflow-auth")).start()
    yield server
    server.stop()


def status(paths: Any) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "status", "--json"], capture_output=True,
                         text=True, env={**os.environ, "FLIGHTLOG_DATA_DIR": str(paths.data_dir),
                                         "FLIGHTLOG_AGENT_SOCKET": str(paths.socket)}, timeout=60)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            continue
    return hits


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mlflow_basic_auth_from_the_secret_store(auth_server: AuthMlflowServer, agent_paths: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    assert set_secret("ml_pw", PASSWORD, monkeypatch) == 0
    assert set_secret("ml_wrong", WRONG, monkeypatch) == 0
    tb = tmp_path / "tb"
    common = {"mlflow_tracking_uri": auth_server.uri, "mlflow_username": "admin", "tensorboard_log_dir": str(tb)}
    good = run_events("good1", "good", {**common, "mlflow_experiment_name": "auth-good",
                                        "mlflow_password": "${secret:ml_pw}"},
                      steps=30, keys=["loss"], sinks=["mlflow", "tensorboard"])
    bad = run_events("bad1", "bad", {**common, "mlflow_experiment_name": "auth-bad",
                                     "mlflow_password": "${secret:ml_wrong}"},
                     steps=30, keys=["loss"], sinks=["mlflow", "tensorboard"])
    write_wal(agent_paths.wal_dir, bad + good)
    agent = AgentProcess(agent_paths).start()
    try:
        deadline = time.monotonic() + 240  # generous: a shared CI runner; idle it settles in seconds
        while time.monotonic() < deadline:
            st_ = status(agent_paths)
            ml = st_["sinks"]["mlflow"]
            if "bad1" in ml["quarantined_runs"] and ml["backlog_events"] == 0 and \
                    st_["sinks"]["tensorboard"]["backlog_events"] == 0:
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"the MLflow sink did not settle: {st_['sinks']}\n{agent.read_log()[-3000:]}")
        text = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "status"], capture_output=True,
                              text=True, timeout=60).stdout
        assert "401" in text and "bad1" in text, text
        assert st_["sinks"]["tensorboard"]["state"] == "ok" and st_["sinks"]["store"]["state"] == "ok"
        # The run with the right password arrived, read back with the same credentials.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        c = MlflowClient(auth_server.uri)
        exp = c.get_experiment_by_name("auth-good")
        [run] = c.search_runs([exp.experiment_id])
        assert len(c.get_metric_history(run.info.run_id, "loss")) == 30
        assert c.get_experiment_by_name("auth-bad") is None
        # Every other sink kept delivering both runs.
        assert {len(v) for v in tb_scalars(next(p for p in tb.iterdir() if "good" in p.name)).values()} == {30}
        assert {len(v) for v in tb_scalars(next(p for p in tb.iterdir() if "bad" in p.name)).values()} == {30}
        # The password is in no command line, while the agent and the server run.
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                raw = cmdline.read_bytes()
            except OSError:
                continue
            assert PASSWORD.encode() not in raw and WRONG.encode() not in raw, cmdline
    finally:
        agent.stop()
    shm = Path("/dev/shm")
    for root in (agent_paths.data_dir, tmp_path / "ckpt", tb, auth_server.root / "artifacts", shm):
        if root.exists():
            for secret in (PASSWORD, WRONG):
                assert not files_holding(root, secret.encode()), (root, secret)


def test_wandb_api_key_from_the_store_is_written_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from conftest_backends import drive

    from flightlog.agent.sinks import WandBTracker

    key = "f1" * 20  # W&B keys are 40 hex characters
    assert set_secret("wb", key, monkeypatch) == 0
    wb = tmp_path / "wandb-dir"
    tracking = {"wandb_mode": "offline", "wandb_dir": str(wb), "wandb_project": "proj",
                "wandb_api_key": "${secret:wb}"}
    write_wal(tmp_path / "wal", run_events("w1", "wrun", tracking, steps=10, keys=["loss"], sinks=["wandb"]))
    [runner] = drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok", runner.stats.last_error
    assert any(p.suffix == ".wandb" for p in wb.rglob("*"))
    for root in (wb, tmp_path / "state", tmp_path / "wal"):
        assert not files_holding(root, key.encode()), root
    # A missing secret parks the run on this sink with the fix in the message.
    write_wal(tmp_path / "wal2", run_events("w2", "wrun2", {**tracking, "wandb_api_key": "${secret:nope}"},
                                            steps=3, keys=["loss"], sinks=["wandb"]))
    [again] = drive([WandBTracker(tmp_path / "state2")], tmp_path / "wal2", tmp_path / "db2.sqlite")
    assert "w2" in again.core.quarantined_runs and "flightlog secrets set nope" in again.stats.last_error
