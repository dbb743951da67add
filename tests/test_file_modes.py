"""What flightlog writes is private (issue 10, item 13): files 0600, directories 0700, under a user's usual
umask of 022; an artifact copy is never wider than its source; a backend nobody uses creates nothing
(item 18: ``sinks/wandb/`` with ``use_wandb: false``)."""
from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_backends import drive, run_events, write_wal

from flightlog.artifacts import copy_artifact, save_git_diff
from flightlog.proto.events import Image, Text

KEYS = ["loss", "acc"]


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most users have (022): files would be 0644 unless flightlog asks for less. Restored after,
    so a sink's ``restrict_umask`` does not leak into the rest of the session either."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Relative path -> permission bits of everything under ``root`` (symlinks not followed), root too."""
    out = {".": stat.S_IMODE(root.lstat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_private(root: Path, *, files: int = 0o600) -> None:
    wide = {}
    for rel, mode in modes(root).items():
        p = root / rel
        if p.is_symlink():
            continue
        want = 0o700 if p.is_dir() else files
        if mode & ~want:
            wide[rel] = oct(mode)
    assert not wide, f"readable or writable by others under {root}: {wide}"


# --- checkpoints -------------------------------------------------------------------------------------


def test_checkpoint_files_and_directories_are_private(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from flightlog.checkpoint import ModelCheckpointer

    ck = ModelCheckpointer(tmp_path / "a" / "ckpt", staging_dir=tmp_path / "stage", max_checkpoints=2)
    try:
        model = torch.nn.Linear(4, 3)
        for step in range(3):
            ck.save(model, epoch=0, step=step, val_loss=1.0 / (step + 1)).wait()
        ck.wait_all()
    finally:
        ck.close()
    files = [p for p in (tmp_path / "a" / "ckpt").iterdir() if ".safetensors" in p.name]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert_private(tmp_path / "a")
    assert_private(tmp_path / "stage")


# --- artifacts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("src_mode, want", [(0o600, 0o600), (0o644, 0o600), (0o755, 0o700), (0o400, 0o400)])
def test_artifact_copy_is_never_wider_than_its_source(tmp_path: Path, src_mode: int, want: int) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(b"x" * 1000)
    os.chmod(src, src_mode)
    link = tmp_path / "link.bin"
    link.symlink_to(src)
    run_dir = tmp_path / "data" / "runs" / "r1"
    for path in (src, link):
        dest, ev = copy_artifact("r1", run_dir, path, f"copy-of-{path.name}")
        assert stat.S_IMODE(dest.stat().st_mode) == want and dest.read_bytes() == b"x" * 1000
        assert ev.size == 1000
    for d in (tmp_path / "data", tmp_path / "data" / "runs", run_dir, run_dir / "artifacts"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_directory_artifact_is_private(tmp_path: Path) -> None:
    src = tmp_path / "tok"
    (src / "sub").mkdir(parents=True)
    os.chmod(src, 0o755)
    os.chmod(src / "sub", 0o775)
    (src / "vocab.txt").write_text("a b c")
    (src / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "vocab.txt", 0o644)
    os.chmod(src / "sub" / "run.sh", 0o755)
    dest, _ = copy_artifact("r1", tmp_path / "runs" / "r1", src)
    assert modes(dest) == {".": 0o700, "sub": 0o700, "vocab.txt": 0o600, "sub/run.sh": 0o700}
    assert_private(tmp_path / "runs", files=0o700)


def test_git_diff_artifact_is_private(tmp_path: Path) -> None:
    saved = save_git_diff("r1", tmp_path / "runs" / "r1", "diff --git a/x b/x\n")
    assert saved is not None
    assert stat.S_IMODE(saved[0].stat().st_mode) == 0o600
    assert_private(tmp_path / "runs")


# --- plots -------------------------------------------------------------------------------------------


def test_plots_are_private(tmp_path: Path) -> None:
    from test_plots import fill_store

    from flightlog.agent.plots import PlotService
    from flightlog.proto.paths import AgentPaths

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    paths = AgentPaths(data_dir=data, socket=tmp_path / "a.sock", ring_dir=tmp_path / "r", spill_dir=data / "s")
    fill_store(paths.store, "r1", 30)
    svc = PlotService(paths, lambda ev: None)
    assert svc.tick() == 1
    svc.close()
    assert (data / "runs" / "r1" / "plots" / "loss.png").exists()
    assert_private(data / "runs")


# --- backend sinks -----------------------------------------------------------------------------------


def test_tensorboard_event_files_are_private(tmp_path: Path) -> None:
    from flightlog.agent.sinks import TensorBoardTracker

    tb = tmp_path / "tb" / "nested"
    write_wal(tmp_path / "wal", run_events("t1", "run one", {"tensorboard_log_dir": str(tb)}, steps=20, keys=KEYS,
                                           sinks=["tensorboard"]))
    [runner] = drive([TensorBoardTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok", runner.stats.last_error
    assert any("tfevents" in p.name for p in tb.rglob("*"))
    assert_private(tmp_path / "tb")
    assert_private(tmp_path / "state")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mlflow_local_store_and_artifacts_are_private(tmp_path: Path) -> None:
    from flightlog.agent.sinks import MLflowTracker

    ml = tmp_path / "ml"
    ml.mkdir(mode=0o700)
    art = tmp_path / "weights.bin"
    art.write_bytes(b"w" * 100)
    os.chmod(art, 0o644)  # as a user's file usually is
    tracking = {"mlflow_tracking_uri": f"sqlite:///{ml}/mlflow.db"}
    png = (b"\x89PNG\r\n\x1a\n" + bytes(8) + (4).to_bytes(4, "big") + (4).to_bytes(4, "big")).ljust(64, b"\0")
    evs = run_events("m1", "mlrun", tracking, steps=5, keys=KEYS, sinks=["mlflow"], end=False)
    _, artifact = copy_artifact("m1", tmp_path / "data" / "runs" / "m1", art, kind="../../escape")  # as the SDK does
    evs += [artifact, Text("m1", "../../../textesc", "hi", 0, time.time()), Image("m1", "plots/../../loss", 1, time.time(), "", png)]
    write_wal(tmp_path / "wal", evs)
    [runner] = drive([MLflowTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok", runner.stats.last_error
    names = {p.name for p in ml.rglob("*")}
    assert "mlflow.db" in names and "mlartifacts" in names and "weights.bin" in names
    escaped = list(tmp_path.glob("**/escape"))  # the artifact type "../../escape", encoded: a folder inside
    assert escaped and all(p.is_relative_to(ml / "mlartifacts") for p in escaped)
    assert not (tmp_path / "escape").exists() and not (ml / "escape").exists()
    texts = list(tmp_path.glob("**/textesc"))
    assert texts and all(p.is_relative_to(ml / "mlartifacts") for p in texts)
    assert_private(ml)


def test_wandb_offline_files_are_private(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from flightlog.agent.sinks import WandBTracker

    wb = tmp_path / "wandb-dir"
    tracking = {"wandb_mode": "offline", "wandb_dir": str(wb), "wandb_project": "proj"}
    write_wal(tmp_path / "wal", run_events("w1", "wrun", tracking, steps=20, keys=KEYS, sinks=["wandb"]))
    [runner] = drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok", runner.stats.last_error
    assert any(p.suffix == ".wandb" for p in wb.rglob("*"))
    assert_private(wb, files=0o700)


def test_unused_backends_create_nothing(tmp_path: Path) -> None:
    from flightlog.agent.sinks import backend_sinks

    tb = tmp_path / "tb"
    tracking = {"tensorboard_log_dir": str(tb), "use_wandb": False, "use_mlflow": False}
    write_wal(tmp_path / "wal", run_events("u1", "tb only", tracking, steps=5, keys=KEYS, sinks=["tensorboard"]))
    sinks = backend_sinks({}, tmp_path / "data")
    runners = drive(sinks, tmp_path / "wal", tmp_path / "db.sqlite")
    assert all(r.stats.state == "ok" for r in runners)
    made = sorted(p.name for p in (tmp_path / "data" / "sinks").iterdir())
    assert made == ["tensorboard"], made  # no sinks/wandb/ (nor sinks/mlflow/) for a run that uses neither
    assert_private(tmp_path / "data")



def test_a_whole_run_leaves_only_private_files(agent_paths: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar started by the tracker, metrics, an artifact, a checkpoint and TensorBoard: every file
    and folder that appears in the data dir, the socket's and ring folders, the event files and the
    checkpoints is private (the agent's own log included)."""
    torch = pytest.importorskip("torch")
    import flightlog
    from flightlog.client import _sidecars

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("FLIGHTLOG_SHM_DIR", str(shm))
    cfg = {"tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(tmp_path / "tb")},
           "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
           "agent": {"autostart": True, "idle_exit_seconds": 0.5}}
    src = tmp_path / "notes.txt"
    src.write_text("hello")
    os.chmod(src, 0o644)
    with flightlog.experiment_tracking("modes", cfg) as t:
        for s in range(20):
            t.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
        t.log_artifact(src)
        t.save_checkpoint(torch.nn.Linear(2, 2), 0, 5, val_loss=0.1).wait()
    assert _sidecars[-1].wait(60) == 0
    assert any("tfevents" in p.name for p in (tmp_path / "tb").rglob("*"))
    for root in (agent_paths.data_dir, agent_paths.socket.parent, shm / f"flightlog-{os.getuid()}",
                 tmp_path / "tb", tmp_path / "ckpt"):
        assert_private(root)
