"""Checkpoints through a real agent process: the write, the registry in the agent's store, the
CheckpointSaved event reaching the store sink, SIGKILL of the agent mid-write, and no agent at all."""
from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import AgentProcess

from flightlog import ExperimentTracker
from flightlog.checkpoint import CheckpointMetadata
from flightlog.proto.checkpoint import Registry, verify_file
from flightlog.proto.paths import AgentPaths


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def _seen(store: Path, deadline_s: float = 30.0, at_least: int = 1) -> list[tuple[Any, ...]]:
    """Rows of the store sink's checkpoints_seen table, once there are ``at_least`` (or what is there at the
    deadline)."""
    end = time.monotonic() + deadline_s
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < end:
        try:
            db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT path, size, checksum, is_best, step FROM checkpoints_seen ORDER BY step").fetchall()
            finally:
                db.close()
        except sqlite3.OperationalError:
            rows = []
        if len(rows) >= at_least:
            return rows
        time.sleep(0.05)
    return rows


def test_tracker_saves_through_the_agent_and_sinks_see_it(agent: AgentProcess, base_config: dict,
                                                          tmp_path: Path) -> None:
    base_config["checkpointing"].update(monitor="val_loss", max_checkpoints=2)
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.Adam(model.parameters())
    with ExperimentTracker("ck", base_config) as tracker:
        assert tracker._client is not None
        paths = []
        for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]:
            paths.append(tracker.save_checkpoint(model=model, epoch=0, step=step, optimizer=opt,
                                                 train_loss=val + 1, val_loss=val))
        tracker.flush()
        metas = [p.wait() for p in paths]
        assert all(isinstance(m, CheckpointMetadata) and m.run_id == tracker.run_id for m in metas)
        assert tracker.get_best_checkpoint() == paths[1]
        assert tracker.load_checkpoint("best", model, opt) == (0, 2)
        assert tracker.should_checkpoint(4) is False  # save_frequency 0: only explicit saves
    ckdir = Path(base_config["checkpointing"]["checkpoint_dir"])
    want = sorted(Path(p).name for p in (paths[1], paths[2], paths[3]))
    end = time.monotonic() + 10  # the agent answers at durability; its retention deletes right after
    while sorted(p.name for p in ckdir.iterdir()) != want and time.monotonic() < end:
        time.sleep(0.02)
    assert sorted(p.name for p in ckdir.iterdir()) == want
    with Registry(agent.paths.store) as reg:
        rows = reg.entries(str(ckdir), ("done", "deleted"))
    assert [r["state"] for r in rows] == ["deleted", "done", "done", "done"]
    seen = _seen(agent.paths.store, at_least=4)  # the store sink delivers them in its own time
    assert len(seen) == 4, seen
    by_step = {r[4]: r for r in seen}
    assert by_step[2][0] == paths[1] and by_step[2][1] == metas[1].size and by_step[2][2] == metas[1].checksum
    assert [by_step[s][3] for s in (1, 2, 3, 4)] == [1, 1, 0, 0]


def test_sigkill_agent_mid_write_never_leaves_a_loadable_corrupt_file(agent: AgentProcess, agent_paths: AgentPaths,
                                                                      base_config: dict) -> None:
    ckdir = Path(base_config["checkpointing"]["checkpoint_dir"])
    torch.manual_seed(0)
    state = {"big": torch.randn(48 << 20), "small": torch.arange(10)}  # 192 MiB of incompressible floats
    tracker = ExperimentTracker("kill", base_config)
    restarted: AgentProcess | None = None
    try:
        pending = tracker.save_checkpoint(state, 0, 7)
        tmp: list[Path] = []
        while not tmp and not pending.done():
            tmp = [p for p in ckdir.glob(".*.tmp-*") if _size(p) > 0] if ckdir.exists() else []
            time.sleep(0.001)
        assert tmp, "the write finished before the test could see its temporary file"
        agent.kill()
        # Nothing under a final name may be partial: whatever is there verifies.
        for p in ckdir.iterdir():
            if not p.name.startswith("."):
                verify_file(p)
        assert not Path(pending).exists()
        with Registry(agent_paths.store) as reg:
            assert reg.get(str(pending))["state"] == "writing"
        restarted = AgentProcess(agent_paths).start()
        meta = pending.wait(timeout=120)  # the SDK re-sent it: written from the staged buffer
        assert meta.path == pending and verify_file(pending) == meta.checksum
        assert not list(ckdir.glob(".*.tmp-*")), "the dead agent's temporary file was not cleaned up"
        holder: dict[str, torch.Tensor] = {}

        class Holder:
            def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
                holder.update(sd)

        assert tracker.load_checkpoint(pending, Holder()) == (0, 7)
        assert torch.equal(holder["big"], state["big"]) and torch.equal(holder["small"], state["small"])
        with Registry(agent_paths.store) as reg:
            assert reg.get(str(pending))["state"] == "done"
        assert [r[0] for r in _seen(agent_paths.store)] == [pending]  # written by the restarted agent
    finally:
        tracker.finish()
        if restarted is not None:
            restarted.stop()


def test_without_an_agent_the_tracker_writes_in_process(agent_paths: AgentPaths, base_config: dict) -> None:
    model = torch.nn.Linear(8, 8)
    with ExperimentTracker("noagent", base_config) as tracker:
        assert tracker._client is None
        p = tracker.save_checkpoint(model, 0, 1, None, is_best=True)
        tracker.save_checkpoint(model, 0, 2)
        assert p.wait().is_best
        assert tracker.get_best_checkpoint() == p
        assert tracker.load_checkpoint("latest", model) == (0, 2)
    with Registry(agent_paths.store) as reg:  # the same registry the agent uses
        assert [r["step"] for r in reg.entries()] == [1, 2]


@pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")
def test_upload_best_reaches_mlflow_and_wandb_after_retention_removed_the_file(
        agent: AgentProcess, base_config: dict, tmp_path: Path) -> None:
    """checkpointing.upload: best. Each new best becomes an artifact in MLflow (a real SQLite store) and a
    version of a W&B ``model`` artifact (offline log), even after retention deleted the local file; the
    upload links in the agent's data dir go once every sink has passed them."""
    from conftest_backends import read_wandb_log
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # create the tables before the agent does
    base_config["tracking"].update(use_mlflow=True, mlflow_tracking_uri=uri, mlflow_experiment_name="up",
                                   use_wandb=True, wandb_mode="offline", wandb_dir=str(tmp_path / "wb"))
    base_config["checkpointing"].update(monitor="val_loss", max_checkpoints=1, upload="best")
    model = torch.nn.Linear(64, 64)
    with ExperimentTracker("up", base_config) as tracker:
        paths = [tracker.save_checkpoint(model=model, epoch=0, step=s, val_loss=v) for s, v in [(1, 3.0), (2, 1.0), (3, 2.0)]]
        metas = [p.wait() for p in paths]
        tracker.flush()
    assert [m.is_best for m in metas] == [True, True, False]
    assert not Path(paths[0]).exists()  # retention took it before (or while) it was uploaded
    client = MlflowClient(tracking_uri=uri)
    uploaded: list[str] = []
    wandb_versions: list[Any] = []
    uploads = agent.paths.data_dir / "uploads"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("up")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        uploaded = sorted(Path(a.path).name for a in client.list_artifacts(runs[0].info.run_id, "checkpoint")) if runs else []
        wandb_versions = [r.artifact for p in (tmp_path / "wb").rglob("*.wandb") for r in read_wandb_log(p)
                          if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
        if len(uploaded) == 2 and len(wandb_versions) == 2 and not any(uploads.iterdir()):
            break
        time.sleep(0.5)
    assert uploaded == sorted(Path(p).name for p in paths[:2])
    got = Path(client.download_artifacts(runs[0].info.run_id, f"checkpoint/{Path(paths[1]).name}", str(tmp_path / "dl")))
    assert verify_file(got) == metas[1].checksum
    assert len(wandb_versions) == 2 and len({a.name for a in wandb_versions}) == 1  # two versions of one artifact
    assert {f.path for a in wandb_versions for f in a.manifest.contents} == {Path(p).name for p in paths[:2]}
    assert not any(uploads.iterdir()), list(uploads.iterdir())


def test_an_agent_made_event_comes_after_what_its_run_published_first(agent_paths: AgentPaths, base_config: dict,
                                                                       tmp_path: Path) -> None:
    """With a long batching window, the tracker's RunStart waits in its ring while the agent writes the run's
    checkpoint: the CheckpointSaved the agent appends must still come after the RunStart in the WAL (a sink
    that learns its runs from their RunStart would otherwise pass over it)."""
    from flightlog.agent.runner import decode_batch
    from flightlog.agent.wal import WALReader
    from flightlog.agent.wal.format import WalCursor

    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text("agent:\n  linger_ms: 5000\n")
    agent = AgentProcess(agent_paths, ["--config", str(agent_yaml)]).start()
    try:
        with ExperimentTracker("order", base_config) as tracker:
            tracker.save_checkpoint(model=torch.nn.Linear(2, 2), epoch=0, step=1).wait()
            run_id = tracker.run_id
    finally:
        agent.stop()
    reader = WALReader(agent_paths.wal_dir)
    items, _ = reader.read(WalCursor(), max_events=10_000)
    kinds = [type(ev).__name__ for _, ev in decode_batch(items, lambda s, e: None) if ev.run_id == run_id]
    reader.close()
    assert "RunStart" in kinds and "CheckpointSaved" in kinds, kinds
    assert kinds.index("RunStart") < kinds.index("CheckpointSaved"), kinds


def test_an_agent_made_event_reaches_the_store_without_waiting_a_window(agent_paths: AgentPaths, base_config: dict,
                                                                         tmp_path: Path) -> None:
    """The agent's own events are appended outside the ingest loop's windows: the sinks take them at once.
    (They once woke the sinks with no start time: a sink then lingered a full window from that moment and
    ignored the next window's wake-up, so that window's events waited two.) With a 20 s window the
    checkpoint's row is in the store long before the window could have ended."""
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text("agent:\n  linger_ms: 20000\n")
    agent = AgentProcess(agent_paths, ["--config", str(agent_yaml)]).start()
    try:
        with ExperimentTracker("prompt", base_config) as tracker:
            t0 = time.monotonic()
            tracker.save_checkpoint(model=torch.nn.Linear(2, 2), epoch=0, step=1).wait()
            rows: list[tuple[str]] = []
            while not rows and time.monotonic() - t0 < 15:
                time.sleep(0.05)
                with contextlib.closing(sqlite3.connect(agent_paths.store)) as db:
                    try:
                        rows = db.execute("SELECT run_id FROM checkpoints_seen WHERE run_id=?",
                                          (tracker.run_id,)).fetchall()
                    except sqlite3.OperationalError:  # the store's tables are not made yet
                        continue
            assert rows, "the checkpoint waited for the batching window"
    finally:
        agent.stop()
