"""Private by default (issue 13, item 2), checked as another user would try it: after a whole run (sidecar,
metrics, an artifact, checkpoints, TensorBoard, plots, a spill file, the audit log) uid 65534 can read no file
and list no directory flightlog created, under folders that themselves let everybody in; a symlink planted at
the predictable ``<shm>/flightlog-<uid>`` is refused and nothing is written through it."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# The other user's probe is plain sh (our Python lives under /root, which nobody cannot enter): every file it
# can read and every directory it can list, one per line.
PROBE = ('for p in "$@"; do if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "listed $p"; '
         'elif [ -e "$p" ]; then cat "$p" >/dev/null 2>&1 && echo "read $p"; fi; done; true')


def readable_by_nobody(paths: list[Path]) -> list[str]:
    out = subprocess.run([*NOBODY, "sh", "-c", PROBE, "sh", *map(str, paths)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def everything_under(*roots: Path) -> list[Path]:
    found: list[Path] = []
    for root in roots:
        if root.exists():
            found.append(root)
            found.extend(p for p in root.rglob("*") if not p.is_symlink())
    return found


@pytest.fixture
def open_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 0755 folder in /tmp (pytest's own tmp folders are 0700, which would hide everything from the other
    user whatever flightlog does), with a world-writable sticky ``shm`` inside, like /dev/shm."""
    base = Path(tempfile.mkdtemp(prefix="fl-open-", dir="/tmp"))
    os.chmod(base, 0o755)
    shm = base / "shm"
    shm.mkdir()
    os.chmod(shm, 0o1777)
    monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(base / "data"))
    monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(base / "sock" / "a.sock"))
    monkeypatch.setenv("FLIGHTLOG_SHM_DIR", str(shm))
    old = os.umask(0o022)  # the usual umask: a file flightlog does not restrict would be world-readable
    try:
        yield base
    finally:
        os.umask(old)
        shutil.rmtree(base, ignore_errors=True)


def test_another_uid_can_read_nothing_a_whole_run_created(open_base: Path) -> None:
    torch = pytest.importorskip("torch")
    import flightlog
    from flightlog.agent.cli import main
    from flightlog.client import _sidecars
    from flightlog.proto.ring import spill_path
    from flightlog.ring import RingProducer

    base = open_base
    cfg = {"tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(base / "tb")},
           "checkpointing": {"checkpoint_dir": str(base / "ckpt"), "max_checkpoints": 1},
           "agent": {"autostart": True, "idle_exit_seconds": 0.5}}
    src = base / "notes.txt"
    src.write_text("hello")
    with flightlog.experiment_tracking("private", cfg) as t:
        for s in range(30):
            t.log_metrics({"train/loss": 1.0 / (s + 1), "val/loss": 1.2 / (s + 1)}, step=s)
        t.log_artifact(src)
        for step in (5, 6):
            t.save_checkpoint(torch.nn.Linear(2, 2), 0, step, val_loss=0.1).wait()
        run_id = t.run_id
    assert _sidecars[-1].wait(60) == 0
    assert main(["plot", run_id]) == 0  # plots into <data>/runs/<id>/plots, and an audit entry
    # A spill file, as a producer whose ring is full writes one (a tiny ring nobody drains).
    shm_user = base / "shm" / f"flightlog-{os.getuid()}"
    ring = RingProducer(shm_user / "spill-test" / "p.ring", 4096, "p-spill", base / "data" / "spill")
    for _ in range(20):
        ring.write_frame(b"x" * 1000)
    assert spill_path(base / "data" / "spill", "p-spill", 1).exists()
    roots = [base / "data", base / "sock", shm_user, base / "tb", base / "ckpt"]
    made = everything_under(*roots)
    names = {p.name for p in made}
    assert {"wal", "flightlog.db", "audit.log", "audit.seal", "audit.key", "p.ring", "loss.png"} <= names, names
    assert any("tfevents" in n for n in names) and any(".safetensors" in n for n in names)
    assert any(n.endswith(".spill") for n in names)
    src_shown = readable_by_nobody([src])  # the probe works: the user's own 0644 file is readable to them
    assert src_shown == [f"read {src}"], src_shown
    leaks = readable_by_nobody(made)
    assert not leaks, leaks
    for p in made:  # and the modes say why: nothing for group or others
        assert stat.S_IMODE(p.lstat().st_mode) & 0o077 == 0 or p.is_socket(), (p, oct(p.lstat().st_mode))


def test_a_symlink_planted_at_the_shm_path_is_refused(open_base: Path) -> None:
    """``<shm>/flightlog-<uid>`` is predictable: another user may plant a symlink there, to a folder of theirs.
    flightlog refuses it (the rings and staging go to the private fallback) and writes nothing through it."""
    torch = pytest.importorskip("torch")
    import flightlog
    from flightlog.client import _sidecars

    base = open_base
    trap = base / "attacker"
    trap.mkdir(mode=0o777)
    os.chown(trap, 65534, 65534)
    planted = base / "shm" / f"flightlog-{os.getuid()}"
    planted.symlink_to(trap)
    cfg = {"tracking": {"use_tensorboard": False},
           "checkpointing": {"checkpoint_dir": str(base / "ckpt")},
           "agent": {"autostart": True, "idle_exit_seconds": 0.5}}
    with flightlog.experiment_tracking("trap", cfg) as t:
        t.log_metrics({"loss": 1.0}, step=0)
        t.save_checkpoint(torch.nn.Linear(2, 2), 0, 1).wait()
    assert _sidecars[-1].wait(60) == 0
    assert list(trap.iterdir()) == []
    assert planted.is_symlink()  # left alone: not ours to remove
    fallback = base / "sock" / "run"
    assert fallback.is_dir() and stat.S_IMODE(fallback.stat().st_mode) == 0o700


def test_access_group_shares_checkpoints_with_that_group_only(open_base: Path) -> None:
    """``access.group``: the checkpoint is 0640 and its folder 0750, both the group's; a member (uid 65534,
    whose group it is) reads it, and the writer's registry stays private."""
    torch = pytest.importorskip("torch")
    import grp

    from flightlog.checkpoint import ModelCheckpointer

    group = grp.getgrgid(65534).gr_name
    ck = ModelCheckpointer(open_base / "ckpt", staging_dir=open_base / "stage", group=group)
    try:
        saved = ck.save(torch.nn.Linear(2, 2), epoch=0, step=1).wait()
    finally:
        ck.close()
    path, folder = Path(saved.path), open_base / "ckpt"
    assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (0o640, 65534)
    assert (stat.S_IMODE(folder.stat().st_mode), folder.stat().st_gid) == (0o750, 65534)
    assert readable_by_nobody([folder, path, folder / "registry.db"]) == [f"listed {folder}", f"read {path}"]


def test_a_symlink_at_a_spill_or_staging_name_is_not_written_through(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from flightlog.checkpoint.staging import StagingBuffer
    from flightlog.proto.errors import CheckpointError
    from flightlog.proto.ring import spill_path
    from flightlog.ring import RingProducer

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o700)
    spill_path(spill, "p1", 1).symlink_to(victim)
    ring = RingProducer(tmp_path / "rings" / "p1.ring", 4096, "p1", spill)
    for _ in range(20):
        ring.write_frame(b"x" * 1000)
    assert ring.dropped > 0 and victim.read_bytes() == b"precious"
    staged = tmp_path / "stage" / "ckpt-1-x-0.buf"
    staged.parent.mkdir(mode=0o700)
    staged.symlink_to(victim)
    with pytest.raises((CheckpointError, OSError)):
        StagingBuffer(staged).ensure(1000)
    assert victim.read_bytes() == b"precious" and torch is not None
