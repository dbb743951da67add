"""A rank of a distributed job SIGKILLed in the middle of a sharded checkpoint (issue 11): the run ends
crashed naming that rank, every point the other ranks logged is there, and the checkpoint being written is
never listed and its partial directory is removed (by the coordinator, or, when the coordinator died too,
by the next distributed checkpointer on its host)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import AgentProcess
from test_crashed import wait_status
from test_dcp_tracker import N, job_run, listed, points, torchrun

from flightlog.proto.checkpoint.registry import STANDALONE_NAME, Registry

pytest.importorskip("torch.distributed")
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]


def test_rank_killed_mid_save_crashes_the_run_and_its_partial_checkpoint_is_never_listed(
        agent: AgentProcess, base_config: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    config = {**base_config, "checkpointing": {"checkpoint_dir": str(ckpt), "max_checkpoints": 1,
                                               "dcp_timeout_seconds": 10}}
    proc = torchrun(tmp_path, 4, config, "kill")
    assert proc.returncode != 0
    run_id = job_run(proc, 4)
    row = wait_status(agent.paths, run_id, "crashed")
    assert row["error"].startswith("rank 2 crashed") and "rank 0" not in row["error"] and "rank 3" not in row["error"]
    assert points(run_id) == {(r, k): N for r in range(4) for k in ("ddp_loss", "fsdp_loss")}
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("P3")) == [
        f"P3 FAILED {r}" for r in (0, 1, 3)]
    p1, p2 = json.loads((tmp_path / "paths.json").read_text())
    p3 = (tmp_path / "p3").read_text()
    assert [r["path"] for r in listed(ckpt)] == [p2]  # p1: retention (max_checkpoints 1); p3: never complete
    states = {r["path"]: r["state"] for r in listed(ckpt, "--all")}
    assert states == {p1: "deleted", p2: "done", p3: "failed"}
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith(STANDALONE_NAME)) == [Path(p2).name]


def test_a_dead_coordinators_partial_checkpoint_is_removed_by_the_next_one_on_its_host(tmp_path: Path) -> None:
    """The coordinator itself died mid-save (its row still 'writing'): the next distributed checkpointer's
    recovery removes the directory; a live coordinator's save, and another host's, are left alone."""
    from flightlog.checkpoint.distributed import recover_partial

    registry = tmp_path / STANDALONE_NAME
    child = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from flightlog.proto.checkpoint.registry import Registry
        path, host = sys.argv[1], sys.argv[2]
        spec = {"path": path, "run_id": "job", "epoch": 0, "step": 1, "codec": "dcp-zstd", "level": 1,
                "request_id": f"dcp:{host}:{os.getpid()}:abcd"}
        with Registry(sys.argv[3]) as reg:
            reg.begin(spec, path)  # then the directory, then the rank files, as a real save does
        Path(path).mkdir()
        (Path(path) / "rank00001.safetensors.zst").write_bytes(b"partial")
        if sys.argv[4] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        print("ready", flush=True)
        sys.stdin.read()
    """)
    host = os.environ.get("FLIGHTLOG_NODE") or __import__("socket").gethostname()
    dead, elsewhere, live = (str(tmp_path / f"ckpt-job-e0000-s00000000{i}.dcp") for i in (1, 2, 3))
    for path, h, how in ((dead, host, "die"), (elsewhere, "other-node", "die")):
        proc = subprocess.run([sys.executable, "-c", child, path, h, str(registry), how], timeout=60)
        assert proc.returncode == -signal.SIGKILL
    alive = subprocess.Popen([sys.executable, "-c", child, live, host, str(registry), "live"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout is not None and alive.stdout.readline() == "ready\n"
        assert recover_partial(registry) == [dead]
        assert not Path(dead).exists() and Path(elsewhere).is_dir() and Path(live).is_dir()
        with Registry(registry, readonly=True) as reg:
            assert {r["path"]: r["state"] for r in reg.entries(None, ("writing", "failed"))} == {
                dead: "failed", elsewhere: "writing", live: "writing"}
            assert reg.entries(None) == []  # none was ever listed
    finally:
        alive.communicate("", timeout=30)
