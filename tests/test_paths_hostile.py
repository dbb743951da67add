"""Hostile names and planted directories: no user string leaves its root directory (issue 10, item 3), and a
symlink or another user's directory at a per-user path is never followed, chmod-ed or written into (item 11);
a staging directory's parent keeps its mode (item 12)."""
from __future__ import annotations

import os
import posixpath
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flightlog
from flightlog.agent.plots import PlotService
from flightlog.agent.sinks import TensorBoardTracker
from flightlog.artifacts import copy_artifact
from flightlog.proto.errors import ConfigError
from flightlog.proto.events import Metrics, RunEnd, RunStart
from flightlog.proto.names import check_file_name, check_run_id, child_path, safe_component, safe_relpath
from flightlog.proto.paths import AgentPaths, ensure_private_dir, ensure_ring_dir, resolve_paths

# Names an attacker (or a careless script) would try, plus whatever hypothesis comes up with.
HOSTILE = ["exp1/seed3", "../../x", "..", ".", "", "/etc/passwd", "a\0b", "a/../../b", "~root", "-rf",
           ".hidden", "x" * 300, "é" * 200, "\ud800", "a\\..\\b", " ", "\n", "con", "a//b", "./a"]
names = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=80),
                  st.text(alphabet="./\\\0ab-_~", max_size=40))


def _inside(path: Path | str, root: Path | str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base + os.sep)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- item 3: every name that reaches a path -------------------------------------------------------------


@given(names)
@settings(max_examples=300, deadline=None)
def test_run_ids_are_plain_names_or_a_value_error_naming_run_id(text: str) -> None:
    root = Path("/data")
    paths = AgentPaths(data_dir=root, socket=root / "a.sock", ring_dir=Path("/shm/r"), spill_dir=root / "spill")
    try:
        run_id = check_run_id(text)
    except ValueError as exc:
        assert "run_id" in str(exc)
        with pytest.raises(ValueError, match="run_id"):
            paths.run_dir(text)
        return
    # Everything the run id names: its run directory, ring and spill files.
    for path, base in ((paths.run_dir(run_id), root / "runs"), (paths.ring_dir / f"{run_id}-1-abc.ring", paths.ring_dir),
                       (paths.spill_dir / f"{run_id}-1-abc.0.spill", paths.spill_dir)):
        norm = posixpath.normpath(str(path))
        assert posixpath.dirname(norm) == str(base), (text, norm)


@given(names)
@settings(max_examples=300, deadline=None)
def test_encoded_names_are_one_component(text: str) -> None:
    for limit in (100, 64, 5):
        c = safe_component(text, limit)
        assert c and c not in (".", "..") and "/" not in c and "\0" not in c and not c.startswith(".")
        assert len(c) <= max(limit, 3)
    rel = safe_relpath(text)
    assert not rel.startswith("/")
    assert all(part not in ("", ".", "..") for part in rel.split("/")) or rel == ""
    assert _inside(posixpath.join("/root/artifacts", rel), "/root/artifacts")


@given(names, names)
@settings(max_examples=200, deadline=None)
def test_tensorboard_run_dirs_stay_under_the_log_dir(name: str, run_id: str) -> None:
    base = "/logs/tb"
    sink = TensorBoardTracker("/nonexistent-state", defaults={"tensorboard_log_dir": base})
    d = sink.run_dir(RunStart(run_id=run_id, name=name, timestamp=0.0))
    assert posixpath.dirname(posixpath.normpath(str(d))) == base


@given(names)
@settings(max_examples=300, deadline=None)
def test_wandb_run_ids_are_plain(run_id: str) -> None:
    from flightlog.agent.sinks.wandb_sink import wandb_run_id

    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", wandb_run_id(run_id))


@pytest.mark.parametrize("run_id", ["exp1/seed3", "../../x", "/abs", "..", "ok.run-1"])
def test_checkpoint_paths_stay_in_the_checkpoint_dir_whatever_the_run_id(tmp_path: Path, run_id: str) -> None:
    torch = pytest.importorskip("torch")
    from flightlog.checkpoint import ModelCheckpointer

    root = tmp_path / "ckpt"
    try:
        ck = ModelCheckpointer(root, staging_dir=tmp_path / "stage", run_id=run_id)
    except ValueError as exc:
        assert "run_id" in str(exc)
        return
    try:
        path = ck.save(torch.nn.Linear(2, 2), epoch=1, step=2)
        path.wait()
    finally:
        ck.close()
    assert Path(path).parent == root and _inside(path, root)
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file() and "stage" not in p.parts} == {root}


@given(names)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_artifact_names_never_leave_the_artifacts_dir(tmp_path: Path, text: str) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        top = Path(tmp)
        src = top / "src.txt"
        src.write_text("payload")
        run_dir = top / "data" / "runs" / "r1"
        before = _tree(top)
        try:
            dest, ev = copy_artifact("r1", run_dir, src, text)
        except ValueError as exc:
            assert "log_artifact name" in str(exc)
            created = _tree(top) - before
            assert all(c.startswith("data") and not Path(top, c).is_file() for c in created), created
            return
        assert _inside(dest, run_dir / "artifacts") and dest.parent == run_dir / "artifacts"
        assert dest.read_text() == "payload" and ev.name == text
        assert {c for c in _tree(top) - before if Path(top, c).is_file()} == {str(dest.relative_to(top))}


def test_file_names_and_child_paths_name_the_argument(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "..", "", "x" * 256, "a\0b"):
        with pytest.raises(ValueError, match="plot name"):
            check_file_name(bad, "plot name")
    (tmp_path / "root").mkdir()
    os.symlink("/etc", tmp_path / "root" / "link")
    with pytest.raises(ValueError, match="checkpoint name"):
        child_path(tmp_path / "root", "link", "passwd", what="checkpoint name")
    with pytest.raises(ValueError, match="checkpoint name"):
        child_path(tmp_path / "root", "..", "x", what="checkpoint name")
    assert child_path(tmp_path / "root", "a", "b") == tmp_path / "root" / "a" / "b"


@pytest.mark.parametrize("run_id", ["exp1/seed3", "../../x", "/abs", "a\0b", ".."])
def test_tracker_refuses_a_path_like_run_id_before_creating_anything(
        agent_paths: AgentPaths, base_config: dict[str, Any], run_id: str) -> None:
    rings_before = set(os.listdir(agent_paths.ring_dir)) if agent_paths.ring_dir.exists() else set()
    data_before = _tree(agent_paths.data_dir)
    with pytest.raises(ValueError, match="run_id"):
        flightlog.ExperimentTracker("hostile", base_config, run_id=run_id)
    rings_after = set(os.listdir(agent_paths.ring_dir)) if agent_paths.ring_dir.exists() else set()
    assert rings_after == rings_before and _tree(agent_paths.data_dir) == data_before


def test_plot_service_skips_run_ids_that_would_leave_the_data_dir(tmp_path: Path) -> None:
    from flightlog.agent.store import Store

    data = tmp_path / "a" / "b" / "data"
    data.mkdir(parents=True)
    paths = AgentPaths(data_dir=data, socket=tmp_path / "s.sock", ring_dir=tmp_path / "r", spill_dir=data / "s")
    store = Store(paths.store)
    for rid in ("../../../evil", "good"):
        store.apply([RunStart(rid, "plots", time.time()),
                     *(Metrics(rid, s, time.time(), {"train/loss": 1.0 / (s + 1)}) for s in range(20)),
                     RunEnd(rid, "completed", time.time())])
    store.close()
    before = _tree(tmp_path)
    svc = PlotService(paths, lambda ev: None)
    assert svc.tick() == 1
    svc.close()
    created = _tree(tmp_path) - before
    assert (data / "runs" / "good" / "plots" / "loss.png").exists()
    assert all(c.startswith("a/b/data/") for c in created), created
    assert not [c for c in created if "evil" in c] and not (tmp_path / "evil").exists()


# --- item 11: planted per-user directories ----------------------------------------------------------------


@pytest.fixture
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /dev/shm (sticky, world-writable), so nothing touches the real one."""
    base = tmp_path / "shm"
    base.mkdir()
    os.chmod(base, 0o1777)
    monkeypatch.setenv("FLIGHTLOG_SHM_DIR", str(base))
    return base


def test_symlink_planted_at_the_runtime_dir_is_neither_followed_nor_chmodded(
        shm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "tmp-standin"
    target.mkdir()
    os.chmod(target, 0o1777)
    planted = shm / f"flightlog-{os.getuid()}"
    planted.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link.*remove it"):
        ensure_private_dir(planted)
    monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(tmp_path / "sock" / "a.sock"))
    paths = resolve_paths()
    assert paths.ring_dir.parent == tmp_path / "sock" / "run"  # the fallback, derived from the socket
    ensure_private_dir(paths.socket.parent)
    ensure_ring_dir(paths)
    assert stat.S_IMODE(target.stat().st_mode) == 0o1777 and not list(target.iterdir())
    assert stat.S_IMODE(paths.ring_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.ring_dir.parent.stat().st_mode) == 0o700


def test_existing_directories_keep_their_mode(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(ConfigError, match="writable by other users.*chmod go-w"):
        ensure_private_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o777
    readable = tmp_path / "readable"
    readable.mkdir()
    os.chmod(readable, 0o755)
    ensure_private_dir(readable)  # nobody else can write there: fine, and not ours to chmod
    assert stat.S_IMODE(readable.stat().st_mode) == 0o755
    made = ensure_private_dir(tmp_path / "x" / "y" / "z")
    for d in (tmp_path / "x", tmp_path / "x" / "y", made):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_private_dir(tmp_path / "file")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")


@needs_root
def test_another_users_runtime_dir_is_refused_and_agent_and_sdk_fall_back_alike(
        shm: Path, agent_paths: AgentPaths, base_config: dict[str, Any], tmp_path: Path) -> None:
    planted = shm / f"flightlog-{os.getuid()}"
    planted.mkdir()
    os.chown(planted, 12345, 12345)
    os.chmod(planted, 0o777)
    with pytest.raises(ConfigError, match="uid 12345.*remove it"):
        ensure_private_dir(planted)
    paths = resolve_paths()
    assert paths.ring_dir.parent == paths.socket.parent / "run"
    agent = AgentProcess(paths).start()  # today's main: the agent refuses to start
    try:
        t = flightlog.ExperimentTracker("fallback", base_config)
        assert Path(t._producer.path).parent == paths.ring_dir  # the SDK took the agent's fallback too
        for s in range(50):
            t.log_metrics({"loss": float(s)}, step=s)
        t.finish()
        from flightlog.agent.store import Store

        deadline = time.monotonic() + 60
        points: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(points) < 50:
            time.sleep(0.1)
            if paths.store.exists():
                store = Store(paths.store, readonly=True)
                points = [p for p in store.metric_points(t.run_id) if p["key"] == "loss"]
                store.close()
        assert len(points) == 50
        assert not list(planted.iterdir())
        assert stat.S_IMODE(planted.stat().st_mode) == 0o777 and planted.stat().st_uid == 12345
    finally:
        agent.stop()


# --- item 12: a staging directory's parent ----------------------------------------------------------------


@pytest.mark.parametrize("parent_mode", [0o1777, 0o755])
def test_staging_dir_parent_keeps_its_mode(tmp_path: Path, parent_mode: int) -> None:
    pytest.importorskip("torch")
    from flightlog.checkpoint import ModelCheckpointer

    parent = tmp_path / "tmp-standin"
    parent.mkdir()
    os.chmod(parent, parent_mode)
    ck = ModelCheckpointer(tmp_path / "ckpt", staging_dir=parent / "stage")
    try:
        assert stat.S_IMODE(parent.stat().st_mode) == parent_mode
        assert stat.S_IMODE((parent / "stage").stat().st_mode) == 0o700
    finally:
        ck.close()


def test_default_staging_dir_avoids_a_planted_symlink(shm: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from flightlog.checkpoint import ModelCheckpointer
    from flightlog.checkpoint.staging import default_staging_dir

    target = tmp_path / "elsewhere"
    target.mkdir()
    (shm / f"flightlog-{os.getuid()}").symlink_to(target)
    monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(tmp_path / "sock" / "a.sock"))
    assert default_staging_dir() == tmp_path / "sock" / "run" / "ckpt"
    ck = ModelCheckpointer(tmp_path / "ckpt")
    ck.close()
    assert not list(target.iterdir())
