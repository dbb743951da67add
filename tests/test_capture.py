"""Reproducibility capture (git, environment, command line, seed), secret redaction down to the raw WAL
bytes, artifacts, and progress/ETA."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flightlog
from flightlog import capture
from flightlog.agent.store import Store
from flightlog.agent.wal import WalCursor, WALReader
from flightlog.progress import NEVER, Progress
from flightlog.proto.codec import decode_event
from flightlog.proto.events import Artifact, HyperParams, Metrics, RunStart

TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"


@pytest.fixture(autouse=True)
def _fresh_capture() -> Any:
    capture.reset()
    yield
    capture.reset()


def wal_events(wal_dir: Path) -> list[Any]:
    reader = WALReader(wal_dir)
    cursor = WalCursor(0, 0, 0)
    out = []
    try:
        while True:
            items, cursor = reader.read(cursor)
            if not items:
                return out
            out.extend(decode_event(bytes(p)) for _, p in items)
    finally:
        reader.close()


def wal_bytes(wal_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(wal_dir.iterdir()) if p.is_file())


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "train.py").write_text("print('v1')\n")
    git(r, "add", "train.py")
    git(r, "commit", "-q", "-m", "first")
    git(r, "remote", "add", "origin", f"https://x-access-token:{TOKEN}@github.com/acme/model.git")
    return r


# --- redaction -------------------------------------------------------------------------------------------


def test_redact_masks_secret_keys_at_any_depth_and_keeps_lookalikes() -> None:
    params = {
        "lr": 0.1, "api_key": "k1", "apiKey": "k2", "HF_TOKEN": "k3", "db": {"password": "k4", "host": "h"},
        "optimizers": [{"client_secret": "k5", "name": "adam"}], "max_tokens": 512, "pad_token": "<pad>",
        "tokenizer": "bpe", "author": "ann", "use_auth": True, "secret": None,
    }
    out = capture.redact(params)
    assert out["api_key"] == out["apiKey"] == out["HF_TOKEN"] == capture.MASK
    assert out["db"] == {"password": capture.MASK, "host": "h"}
    assert out["optimizers"] == [{"client_secret": capture.MASK, "name": "adam"}]
    for kept in ("lr", "max_tokens", "pad_token", "tokenizer", "author", "use_auth", "secret"):
        assert out[kept] == params[kept], kept
    assert params["api_key"] == "k1"  # the input is not modified


def test_redact_strips_url_credentials_and_known_token_shapes() -> None:
    out = capture.redact({
        "uri": "https://bob:hunter2@mlflow.example.com:5000/path?x=1",
        "mirrors": ["s3://AKIAXX:sekret@bucket/key", "plain text"],
        "note": f"see git clone https://{TOKEN}@github.com/a/b",
        "something": TOKEN,
    })
    assert out["uri"] == "https://mlflow.example.com:5000/path?x=1"
    assert out["mirrors"] == ["s3://bucket/key", "plain text"]
    assert out["note"] == "see git clone https://github.com/a/b"
    assert out["something"] == capture.MASK


def test_redact_words_are_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert capture.redact({"wandb_key": "x"}, extra_keys=["wandb_key"]) == {"wandb_key": capture.MASK}
    monkeypatch.setenv("FLIGHTLOG_REDACT_KEYS", "license, seat-id")
    assert capture.redact({"license": "x", "seat_id": "y", "seat": "z"}) == {
        "license": capture.MASK, "seat_id": capture.MASK, "seat": "z"}
    assert capture.redact({"password": "x"}, words=["license"]) == {"password": "x"}


_names = st.sampled_from(["password", "api_key", "AUTH_TOKEN", "secretKey", "privateKey", "credentials"])
_plain = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(secret=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=12, max_size=30),
       name=_names, path=st.lists(_plain, max_size=3), other=st.dictionaries(_plain, _plain, max_size=4))
def test_redact_never_lets_a_secret_through(secret: str, name: str, path: list[str], other: dict[str, str]) -> None:
    tree: dict[str, Any] = {**other, name: secret, "url": f"postgres://u:{secret}@db:5432/x"}
    for p in reversed(path):
        tree = {p: tree, **{k: v for k, v in other.items() if k != p}}
    assert secret not in json.dumps(capture.redact(tree))


def test_command_line_secrets_masked() -> None:
    argv = ["train.py", "--api-key", "s1", "--token=s2", "--lr", "0.1", "--data", "https://u:s3@host/d",
            "--max-tokens", "5"]
    out = capture.capture_command(argv)["argv"]
    assert out == ["train.py", "--api-key", capture.MASK, f"--token={capture.MASK}", "--lr", "0.1", "--data",
                   "https://host/d", "--max-tokens", "5"]


def test_environment_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "nope")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    env = capture.capture_environment()
    assert env["env"]["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert env["env"]["SLURM_JOB_ID"] == "42"
    assert "nope" not in json.dumps(env)
    assert env["python"] == sys.version.split()[0]
    assert env["ram_bytes"] > 0 and env["cpu_count"] > 0
    assert env["packages"]["msgspec"]  # versions from the dist-info names
    assert "torch" not in sys.modules or env["torch"]


#: Distributions whose names hold a secret word: their versions were masked ("google-auth": "***").
LOOKALIKE_PACKAGES = {"google-auth": "2.38.0", "python-secrets": "24.4.0", "token-bucket": "0.3.0",
                      "django-rest-auth": "0.9.5", "keyring": "25.5.0", "oauthlib": "3.2.2",
                      "requests-oauthlib": "2.0.0", "api-key-manager": "1.0"}


def test_redact_capture_keeps_every_package_version_and_masks_the_rest() -> None:
    info = {"environment": {"packages": dict(LOOKALIKE_PACKAGES), "env": {"HF_TOKEN": "hf-value-SECRET"},
                            "python": "3.11.9"},
            "command": {"argv": ["train.py"], "api_key": "cmd-SECRET"}, "git": {}, "seed": {}}
    out = capture.redact_capture(info)
    assert out["environment"]["packages"] == LOOKALIKE_PACKAGES
    assert out["environment"]["env"] == {"HF_TOKEN": capture.MASK}
    assert out["command"]["api_key"] == capture.MASK and out["environment"]["python"] == "3.11.9"
    assert capture.redact_capture({"environment": {"env": {}}, "auth": "x"}) == {"environment": {"env": {}},
                                                                                 "auth": capture.MASK}


def test_run_start_keeps_package_versions_of_secret_looking_names(
        agent: Any, base_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a real tracker, agent and WAL: the package list arrives with every version as installed."""
    site = tmp_path / "site"
    for name, version in LOOKALIKE_PACKAGES.items():
        (site / f"{name.replace('-', '_')}-{version}.dist-info").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    capture.reset()
    t = flightlog.ExperimentTracker("packages", base_config)
    t.finish()
    agent.stop()
    start = next(e for e in wal_events(agent.paths.wal_dir) if isinstance(e, RunStart))
    packages = start.metadata["environment"]["packages"]
    assert {k: packages[k] for k in LOOKALIKE_PACKAGES} == LOOKALIKE_PACKAGES
    assert capture.MASK not in packages.values()
    assert packages == capture.installed_packages()


# --- git -------------------------------------------------------------------------------------------------


def test_git_capture_clean_then_dirty(repo: Path) -> None:
    info, diff = capture.capture_git(repo)
    assert info["commit"] == git(repo, "rev-parse", "HEAD")
    assert info["branch"] == "main"
    assert info["dirty"] is False and diff == ""
    assert info["remote_url"] == "https://github.com/acme/model.git"
    assert TOKEN not in json.dumps(info)

    (repo / "train.py").write_text("print('v2')\n")
    info, diff = capture.capture_git(repo / ".")
    assert info["dirty"] is True
    assert "-print('v1')" in diff and "+print('v2')" in diff
    assert info["diff_bytes"] == len(diff.encode())


def test_git_capture_outside_a_repository(tmp_path: Path) -> None:
    assert capture.capture_git(tmp_path) == ({}, "")


# --- the tracker: capture at start, redaction before the WAL, artifacts ------------------------------------


def test_run_start_records_capture_and_the_wal_holds_no_secret(
        agent: Any, base_config: dict, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["train.py", "--password", "pw-SECRET-3", "--epochs", "2"])
    (repo / "train.py").write_text("print('dirty')\n")
    cfg = {**base_config, "tracking": {**base_config["tracking"],
                                      "mlflow_tracking_uri": "https://bob:pw-SECRET-1@mlflow.example.com"}}
    capture.seed_everything(1234)
    t = flightlog.ExperimentTracker("capture", cfg)
    t.log_hyperparameters({"lr": 0.25, "wandb_api_key": "pw-SECRET-2", "note": "VISIBLE-MARKER"})
    t.set_tags({"source": f"https://{TOKEN}@github.com/acme/model.git"})
    t.finish()
    agent.stop()

    raw = wal_bytes(agent.paths.wal_dir)
    assert b"VISIBLE-MARKER" in raw  # the WAL is readable as bytes: the checks below can fail
    for secret in (b"pw-SECRET-1", b"pw-SECRET-2", b"pw-SECRET-3", TOKEN.encode()):
        assert secret not in raw

    events = wal_events(agent.paths.wal_dir)
    start = next(e for e in events if isinstance(e, RunStart))
    md = start.metadata
    assert md["git"]["commit"] == git(repo, "rev-parse", "HEAD")
    assert md["git"]["dirty"] is True
    assert md["git"]["remote_url"] == "https://github.com/acme/model.git"
    assert md["command"]["argv"] == ["train.py", "--password", capture.MASK, "--epochs", "2"]
    assert md["seed"]["seed"] == 1234
    assert md["environment"]["python"] == sys.version.split()[0]
    assert start.config["tracking"]["mlflow_tracking_uri"] == "https://mlflow.example.com"
    assert start.config_hash == flightlog.config_hash(cfg)  # the identity is the real config's
    assert t.metadata.git["commit"] == md["git"]["commit"]
    assert t.config.tracking.mlflow_tracking_uri.startswith("https://bob:")  # the process keeps its config

    diff_art = next(e for e in events if isinstance(e, Artifact) and e.kind == "git-diff")
    data = Path(diff_art.path).read_bytes()
    assert b"+print('dirty')" in data
    assert diff_art.checksum == "sha256:" + hashlib.sha256(data).hexdigest()


def test_log_artifact_file_and_directory(agent: Any, base_config: dict, tmp_path: Path) -> None:
    f = tmp_path / "vocab.txt"
    f.write_text("a\nb\n")
    d = tmp_path / "tok"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_text("{}")
    (d / "sub" / "b.bin").write_bytes(b"\x00" * 100)
    with flightlog.ExperimentTracker("art", base_config) as t:
        p1 = t.log_artifact(f, type="vocab")
        p2 = t.log_artifact(d, name="tokenizer")
        f.write_text("changed")
        p3 = t.log_artifact(f)  # same name: replaces the first
        with pytest.raises(FileNotFoundError):
            t.log_artifact(tmp_path / "missing")
        with pytest.raises(ValueError):
            t.log_artifact(f, name="../x")
    assert p1 == p3 == t.run_dir / "artifacts" / "vocab.txt" and p3.read_text() == "changed"
    assert (p2 / "sub" / "b.bin").read_bytes() == b"\x00" * 100
    arts = [e for e in wal_events(agent.paths.wal_dir) if isinstance(e, Artifact) and e.kind != "git-diff"]
    assert [(a.name, a.kind, a.size) for a in arts] == [("vocab.txt", "vocab", 4), ("tokenizer", "dir", 102),
                                                         ("vocab.txt", "file", 7)]
    assert arts[2].checksum == "sha256:" + hashlib.sha256(b"changed").hexdigest()
    assert arts[0].checksum != arts[2].checksum


# --- seeding ---------------------------------------------------------------------------------------------


def test_seed_everything_reproduces_and_reaches_live_trackers(agent: Any, base_config: dict) -> None:
    import numpy as np
    import torch

    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    capture.seed_everything(7)
    a = draw()
    capture.seed_everything(7, deterministic=True)
    assert draw() == a
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    with flightlog.ExperimentTracker("seed", base_config) as t:
        assert t.metadata.seed["seed"] == 7
        info = capture.seed_everything(99)
        assert info["seeded"] == ["random", "numpy", "torch"]
        assert t.metadata.seed["seed"] == 99
    params = [e for e in wal_events(agent.paths.wal_dir) if isinstance(e, HyperParams)]
    assert params[-1].params == {"seed": 99, "deterministic": False}
    with pytest.raises(TypeError):
        capture.seed_everything(1.5)  # type: ignore[arg-type]


def test_memory_stats_without_cuda(agent: Any, base_config: dict) -> None:
    with flightlog.ExperimentTracker("mem", base_config) as t:
        import torch

        if torch.cuda.is_available():
            assert any(k.endswith("max_allocated_bytes") for k in t.memory_stats())
        else:
            assert t.memory_stats() == {}


# --- progress --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_rate_eta_and_thresholds() -> None:
    clock = FakeClock()
    p = Progress(1000, bar=False, clock=clock)
    assert p.tick(0) == (1, None)  # the first call only starts the clock
    clock.t += 0.1
    nxt, m = p.tick(10)
    assert m is None and nxt == 10 + int(100 * 0.4)  # 100 steps/s so far: come back in 0.4 s worth of steps
    clock.t += 0.4
    nxt, m = p.tick(50)
    assert m == {"progress/eta_seconds": pytest.approx((1000 - 51) / 100), "progress/steps_per_second": 100.0}
    assert nxt == 50 + 50
    clock.t += 1.0
    _, m = p.tick(999)
    assert m is not None and m["progress/eta_seconds"] == 0.0
    with pytest.raises(ValueError):
        Progress(0)


def test_progress_bar_only_on_a_terminal() -> None:
    clock = FakeClock()
    off = Progress(10, clock=clock)  # pytest captures stdout: not a TTY
    buf = io.StringIO()
    on = Progress(10, bar=True, clock=clock, file=buf)
    for p in (off, on):
        p.tick(0)
    clock.t += 1
    for p in (off, on):
        p.tick(4)
    assert off.bar is None
    assert on.bar is not None and on.bar.n == 5 and "5/10" in buf.getvalue()
    on.close()


def test_tracker_progress_metrics(agent: Any, base_config: dict) -> None:
    with flightlog.ExperimentTracker("prog", base_config, total_steps=40) as t:
        assert t._progress.progress is not None and t._progress.progress.bar is None  # not a TTY here
        for step in range(40):
            t.log_metrics({"loss": 1.0}, step=step)
            time.sleep(0.04)
    assert t._metrics.progress_next == NEVER
    points = [e for e in wal_events(agent.paths.wal_dir) if isinstance(e, Metrics)
              and "progress/eta_seconds" in e.values]
    assert points, "no progress metrics were logged"
    assert all(e.values["progress/steps_per_second"] > 0 for e in points)
    assert [e.step for e in points] == sorted(e.step for e in points)
    db = Store(agent.paths.store, readonly=True)
    deadline = time.monotonic() + 20
    # Sinks deliver when their batch is full or their linger time passed: wait for all, not the first.
    while time.monotonic() < deadline and db.metric_count(t.run_id, "progress/eta_seconds") < len(points):
        time.sleep(0.1)
    found = db.metric_count(t.run_id, "progress/eta_seconds")
    db.close()
    assert found == len(points)
