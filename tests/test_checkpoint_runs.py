"""Checkpoints are per run: two runs sharing a checkpoint_dir keep their own files, best, latest and
retention (in-process, through a tracker without an agent, and written by a real agent); no write replaces
a file another run registered; a run continued with its run_id carries on; an older registry migrates."""
from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flightlog import ExperimentTracker
from flightlog.checkpoint import ModelCheckpointer
from flightlog.proto.checkpoint import Registry
from flightlog.proto.checkpoint.writer import commit_checkpoint
from flightlog.proto.errors import CheckpointError

# val_loss per step. Run 1's best is step 2; run 2's is step 1, and every one of run 2's values is worse
# than run 1's best (the old code, choosing across the directory, gave run 2 no best at all).
RUN1 = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3}
RUN2 = {1: 0.2, 2: 0.9, 3: 0.8, 4: 0.7}
KEEP = 2  # max_checkpoints: the newest 2 plus the best


def _model(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def _tag(run: int, step: int) -> float:
    """The value every weight of run ``run`` holds at ``step``: a load shows which file it read."""
    return 10.0 * run + step


def _weight(ck: ModelCheckpointer, which: str, **kw: Any) -> float:
    target = _model(-1.0)
    ck.load(which, target, **kw)
    return float(target.weight.detach()[0, 0])


@contextmanager
def _run(kind: str, d: Path, run_id: str, cfg: dict[str, Any]) -> Iterator[ModelCheckpointer]:
    """One run's checkpointer: standalone, or a tracker's (through the agent when one is up)."""
    if kind == "standalone":
        with ModelCheckpointer(d, max_checkpoints=KEEP, monitor="val_loss", run_id=run_id) as ck:
            yield ck
        return
    with ExperimentTracker("shared-dir", cfg, run_id=run_id) as tracker:
        assert (tracker._client is not None) == (kind == "agent")
        yield tracker._checkpointer("save_checkpoint")


def _eventually(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    """The agent answers at durability and runs retention right after: wait for it to settle."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _save_all(ck: ModelCheckpointer, run: int, losses: dict[int, float]) -> dict[int, str]:
    paths = {step: ck.save(_model(_tag(run, step)), 0, step, val_loss=loss) for step, loss in losses.items()}
    ck.wait_all()
    return {step: str(p) for step, p in paths.items()}


@pytest.fixture(params=["standalone", "tracker", "agent"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param != "standalone":
        request.getfixturevalue("agent" if request.param == "agent" else "agent_paths")
    return str(request.param)


@pytest.fixture
def cfg(base_config: dict, tmp_path: Path) -> dict:
    base_config["checkpointing"].update(checkpoint_dir=str(tmp_path / "ckpt"), max_checkpoints=KEEP,
                                        monitor="val_loss")
    return base_config


def test_two_runs_in_one_dir_keep_their_own_files_best_latest_and_retention(kind: str, cfg: dict,
                                                                             tmp_path: Path) -> None:
    """The issue's scenario: a script re-run into the same directory with different losses."""
    d = tmp_path / "ckpt"
    with _run(kind, d, "run1", cfg) as ck:
        p1 = _save_all(ck, 1, RUN1)
    kept1 = {p1[s] for s in (2, 3, 4)}  # newest 2 and the best (step 2)
    assert _eventually(lambda: {str(p) for p in d.glob("ckpt-*")} == kept1)
    bytes1 = {p: Path(p).read_bytes() for p in kept1}

    with _run(kind, d, "run2", cfg) as ck:
        p2 = _save_all(ck, 2, RUN2)
        kept2 = {p2[s] for s in (1, 3, 4)}  # run 2's real best (step 1) survives its own retention
        _eventually(lambda: {str(p) for p in d.glob("ckpt-*")} == kept1 | kept2)  # asserted below
        assert {p: _bytes(p) for p in kept1} == bytes1  # run 1's weights, byte for byte
        assert {str(p) for p in d.glob("ckpt-*")} == kept1 | kept2
        assert not kept2 & kept1 and all("run2" in Path(p).name for p in kept2)

        assert ck.best() == p2[1] and ck.latest() == p2[4]
        assert ck.best(run_id="run1") == p1[2] and ck.latest(run_id="run1") == p1[4]
        assert [m.step for m in ck.list()] == [1, 3, 4] and {m.run_id for m in ck.list()} == {"run2"}
        assert [m.step for m in ck.list(run_id="run1")] == [2, 3, 4]
        assert ck.runs() == ["run2", "run1"]
        assert _weight(ck, "best") == _tag(2, 1) and _weight(ck, "latest") == _tag(2, 4)
        assert _weight(ck, "best", run_id="run1") == _tag(1, 2)
        assert _weight(ck, p1[3]) == _tag(1, 3)  # a path loads whichever run wrote it
    with Registry(ck.registry_path) as reg:
        for run, kept, best in (("run1", kept1, p1[2]), ("run2", kept2, p2[1])):
            rows = reg.entries(str(d), ("done",), run_id=run)
            assert {r["path"] for r in rows} == kept
            assert [r["path"] for r in rows if r["is_best"]] == [best]


def test_the_trackers_best_and_load_answer_for_their_own_run(agent_paths: Any, cfg: dict, tmp_path: Path) -> None:
    """ExperimentTracker.get_best_checkpoint / load_checkpoint, per run, and run_id= for another's."""
    with ExperimentTracker("a", cfg, run_id="first") as t1:
        b1 = t1.save_checkpoint(_model(1.0), 0, 1, val_loss=0.1)
        t1.save_checkpoint(_model(2.0), 0, 2, val_loss=0.5)
    with ExperimentTracker("a", cfg, run_id="second") as t2:
        b2 = t2.save_checkpoint(_model(3.0), 0, 1, val_loss=0.9)
        assert t2.get_best_checkpoint() == b2 and t2.get_best_checkpoint(run_id="first") == b1
        target = _model(-1.0)
        assert t2.load_checkpoint("best", target) == (0, 1) and float(target.weight.detach()[0, 0]) == 3.0
        assert t2.load_checkpoint("latest", target, run_id="first") == (0, 2)
        assert float(target.weight.detach()[0, 0]) == 2.0
    with ExperimentTracker("a", cfg, run_id="third") as t3:
        assert t3.get_best_checkpoint() is None
        with pytest.raises(CheckpointError, match="'second', 'first'.*run_id="):
            t3.load_checkpoint("best", _model(0.0))


@pytest.mark.parametrize("kind", ["standalone", "tracker"])
def test_a_run_continued_with_its_run_id_keeps_its_best_latest_and_retention(kind: str, agent_paths: Any,
                                                                            cfg: dict, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    with _run(kind, d, "again", cfg) as ck:
        first = _save_all(ck, 1, {1: 0.5, 2: 0.3})
    with _run(kind, d, "other", cfg) as ck:
        _save_all(ck, 9, {1: 0.01})  # another run in between, with a far better loss
    with _run(kind, d, "again", cfg) as ck:
        assert ck.latest() == first[2] and ck.best() == first[2]
        assert _weight(ck, "latest") == _tag(1, 2)
        second = _save_all(ck, 1, {3: 0.4, 4: 0.6})
        # Retention counts the earlier session's files: the newest 2 (steps 3, 4) plus the best (step 2).
        assert [m.path for m in ck.list()] == [first[2], second[3], second[4]]
        assert not Path(first[1]).exists() and ck.best() == first[2]
        again = ck.save(_model(5.0), 0, 4, val_loss=0.2)  # a re-save of its own step replaces its own file
        again.wait()
        assert str(again) == second[4] and ck.best() == second[4] and _weight(ck, "best") == 5.0
        assert len(ck.list(run_id="other")) == 1


def _spec(path: Path, run_id: str, step: int = 1) -> dict[str, Any]:
    """A spec of an empty checkpoint (no tensors, no staging buffer), as a writer receives it."""
    return {"path": str(path), "run_id": run_id, "epoch": 0, "step": step, "codec": "zstd", "level": 1,
            "tensors": [], "data_bytes": 0, "staging": "", "metadata": {"format": "x"}}


def test_no_write_replaces_a_file_another_run_registered(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    with ModelCheckpointer(d, run_id="run1") as ck:
        p1 = str(ck.save(_model(1.0), 0, 1))
    registry = d / "registry.db"
    before = Path(p1).read_bytes()
    with pytest.raises(CheckpointError, match="run 'run1' registered that path"):
        commit_checkpoint(_spec(Path(p1), "run2"), registry)
    stray = d / "not-a-checkpoint.safetensors.zst"
    stray.write_bytes(b"someone's file")
    with pytest.raises(CheckpointError, match="a file is already there that no run registered"):
        commit_checkpoint(_spec(stray, "run2"), registry)
    assert Path(p1).read_bytes() == before and stray.read_bytes() == b"someone's file"
    with Registry(registry) as reg:
        assert reg.get(p1)["run_id"] == "run1" and reg.get(p1)["state"] == "done"  # type: ignore[index]
        assert reg.get(str(stray)) is None
    assert commit_checkpoint(_spec(Path(p1), "run1"), registry)["state"] == "done"  # its own: replaced


def test_the_checkpointer_picks_another_name_over_a_file_it_did_not_register(tmp_path: Path) -> None:
    """The same run id in two registries (a standalone one and a tracker's), or a stray file under the
    name: save() goes to ``...-1``, ``-2`` and leaves the file alone."""
    d = tmp_path / "ckpt"
    with ModelCheckpointer(d, run_id="same", registry=tmp_path / "a.db") as a:
        pa = str(a.save(_model(1.0), 0, 1))
        a.wait_all()
    before = Path(pa).read_bytes()
    with ModelCheckpointer(d, run_id="same", registry=tmp_path / "b.db") as b:
        pb = str(b.save(_model(2.0), 0, 1))
        stray = Path(pa.replace("-s000000001", "-s000000002"))
        stray.write_bytes(b"stray")
        pc = str(b.save(_model(3.0), 0, 2))
        b.wait_all()
        assert pb != pa and pb.endswith("-s000000001-1.safetensors.zst")
        assert pc != str(stray) and b.latest() == pc and _weight(b, "latest") == 3.0
    assert Path(pa).read_bytes() == before and stray.read_bytes() == b"stray"


def test_the_agent_refuses_to_write_over_another_runs_checkpoint(agent: Any, cfg: dict, tmp_path: Path) -> None:
    """The agent's writer checks too: a request naming another run's file fails, the file stays."""
    with ExperimentTracker("a", cfg, run_id="run1") as t1:
        p1 = str(t1.save_checkpoint(_model(1.0), 0, 1).wait().path)
    before = Path(p1).read_bytes()
    with ExperimentTracker("a", cfg, run_id="run2") as t2:
        ck = t2._checkpointer("save_checkpoint")
        ck._path_for = lambda epoch, step, name=None: p1  # an SDK that names files wrongly, or a crafted request
        with pytest.raises(CheckpointError, match="run 'run1' registered that path"):
            t2.save_checkpoint(_model(2.0), 0, 1).wait()
        assert t2.get_best_checkpoint() is None and ck.list() == []
    assert Path(p1).read_bytes() == before
    with Registry(agent.paths.store) as reg:
        assert reg.get(p1)["run_id"] == "run1"  # type: ignore[index]


# The registry's table as it was before runs were scoped (the same columns; no per-run index).
OLD_SCHEMA = """
CREATE TABLE checkpoints (
    path TEXT PRIMARY KEY, dir TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
    request_id TEXT, run_id TEXT, epoch INTEGER, step INTEGER, metrics TEXT, size INTEGER, checksum TEXT,
    compression TEXT, level INTEGER, dtypes TEXT, nbytes INTEGER, tensors INTEGER, config_hash TEXT,
    git_commit TEXT, created REAL, saved REAL, is_best INTEGER DEFAULT 0, writer_pid INTEGER, tmp_path TEXT,
    error TEXT);
CREATE INDEX checkpoints_dir_state_seq ON checkpoints (dir, state, seq);
"""


def test_a_registry_from_before_runs_migrates_and_keeps_old_files(tmp_path: Path) -> None:
    """Old files (``ckpt-e...-s...``, run id '' or NULL) stay readable as run ''; a new run's retention
    never deletes them; the registry gains the per-run index."""
    src = tmp_path / "src"
    with ModelCheckpointer(src, run_id="x") as ck:
        made = [ck.save(_model(float(s)), 0, s).wait() for s in (1, 2)]
    d = tmp_path / "ckpt"
    d.mkdir()
    db = sqlite3.connect(d / "registry.db")
    db.executescript(OLD_SCHEMA)
    legacy = []
    for seq, (meta, run_id) in enumerate(zip(made, ["", None]), 1):
        path = d / f"ckpt-e0000-s{meta.step:09d}.safetensors.zst"
        shutil.copyfile(meta.path, path)
        legacy.append(str(path))
        db.execute("INSERT INTO checkpoints (path, dir, seq, state, run_id, epoch, step, metrics, size, checksum,"
                   " is_best) VALUES (?,?,?,'done',?,0,?,'{}',?,?,?)",
                   (str(path), str(d), seq, run_id, meta.step, meta.size, meta.checksum, int(seq == 1)))
    db.commit()
    db.close()
    before = {p: Path(p).read_bytes() for p in legacy}
    with ModelCheckpointer(d, run_id="new", max_checkpoints=1) as ck:
        new = [str(ck.save(_model(10.0 + s), 0, s, is_best=s == 1)) for s in (1, 2, 3)]
        ck.wait_all()
        assert ck.best(run_id="") == legacy[0] and ck.latest(run_id="") == legacy[1]
        assert _weight(ck, "latest", run_id="") == 2.0 and _weight(ck, legacy[0]) == 1.0
        assert [m.path for m in ck.list()] == [new[0], new[2]] and ck.best() == new[0]
    assert {p: Path(p).read_bytes() for p in legacy} == before
    db = sqlite3.connect(d / "registry.db")
    try:
        assert db.execute("SELECT COUNT(*) FROM checkpoints WHERE run_id IS NULL").fetchone() == (0,)
        indexes = {r[1] for r in db.execute("PRAGMA index_list(checkpoints)")}
    finally:
        db.close()
    assert "checkpoints_dir_run_state_seq" in indexes


@settings(max_examples=100, deadline=None)
@given(saves=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 5)), max_size=16),
       keep=st.integers(0, 3))
def test_interleaved_runs_each_keep_their_newest_n_plus_their_best(saves: list[tuple[str, int]], keep: int) -> None:
    """Any interleaving of three runs' saves into one directory: retention only ever deletes the saving
    run's files, and leaves each run exactly its newest ``keep`` plus its best (the first lowest loss)."""
    with tempfile.TemporaryDirectory() as tmp, Registry(Path(tmp) / "registry.db") as reg:
        history: dict[str, list[tuple[int, int]]] = {}
        for step, (run, loss) in enumerate(saves):
            spec = {"path": f"{tmp}/ckpt-{run}-s{step}", "run_id": run, "epoch": 0, "step": step, "codec": "zstd",
                    "level": 1, "metrics": {"val_loss": float(loss)},
                    "retention": {"max_checkpoints": keep, "monitor": "val_loss", "mode": "min"}}
            reg.begin(spec, "tmp")
            _, doomed = reg.commit(spec, 1, "x")
            assert all(p.startswith(f"{tmp}/ckpt-{run}-") for p in doomed)
            history.setdefault(run, []).append((step, loss))
        for run, saved in history.items():
            best = min(saved, key=lambda s: s[1])[0]  # min() keeps the first of equals, as a tie does
            want = {s for s, _ in saved} if keep == 0 else {s for s, _ in saved[-keep:]} | {best}
            rows = reg.entries(tmp, run_id=run)
            assert {r["step"] for r in rows} == want
            assert reg.best(tmp, run_id=run)["step"] == best  # type: ignore[index]
