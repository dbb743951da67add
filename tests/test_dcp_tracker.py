"""Sharded checkpoints from the tracker (issue 11, item 4): under a real 4-rank ``torchrun`` (gloo, CPU)
``tracker.save_checkpoint`` on every rank goes through DCP into one directory per checkpoint, committed to
the checkpoint directory's registry only once complete; a 2-rank job loads it back bit-exactly (DDP and
FSDP2, resharded). The same job with a rank SIGKILLed mid-save: tests/test_distributed_kill.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_crashed import wait_status

from flightlog.proto.checkpoint.dcpdir import METADATA_NAME
from flightlog.proto.checkpoint.registry import Registry

pytest.importorskip("torch.distributed")
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]

N = 6  # training steps per model and rank

SCRIPT = """
    import json, os, signal, sys
    from pathlib import Path
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict)
    import flightlog
    from flightlog.checkpoint import StorageReader
    from flightlog.proto.errors import CheckpointError

    config, mode, work, n = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def train(m, o, tracker, key, base):
        g = torch.Generator().manual_seed(10 + rank)
        for i in range(n):
            loss = m(torch.randn(4, 8, generator=g)).pow(2).mean()
            loss.backward()
            o.step()
            o.zero_grad()
            tracker.log_metrics({key: float(loss)}, step=base + i)

    def full(m, o):
        return get_state_dict(m, o, options=FULL)  # collective for FSDP2: every rank calls it

    def same(a, b, what):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), what
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
            for k in a:
                same(a[k], b[k], f"{what}/{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), what
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{what}/{i}")
        else:
            assert a == b, (what, a, b)

    if mode == "kill":
        # torchrun SIGTERMs the other ranks once rank 2 died; like a preemption-aware script, they finish.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    with flightlog.experiment_tracking("dcp-job", config) as tracker:
        sys.stdout.write(f"RUN {rank} {tracker.run_id}\\n")  # one write: ranks share the pipe (print makes two)
        sys.stdout.flush()
        if mode in ("save", "kill"):
            ddp = DDP(net(0))
            o1 = torch.optim.Adam(ddp.parameters(), lr=0.01)
            train(ddp, o1, tracker, "ddp_loss", 0)
            p1 = tracker.save_checkpoint(ddp, 0, n, o1, val_loss=2.0)
            fs = net(1)
            fully_shard(fs)  # each rank holds a shard of every parameter and of its Adam state
            o2 = torch.optim.Adam(fs.parameters(), lr=0.01)
            train(fs, o2, tracker, "fsdp_loss", n)
            p2 = tracker.save_checkpoint(fs, 1, 2 * n, o2, val_loss=1.0, async_save=True)
            ref = {"ddp": full(ddp, o1), "fsdp": full(fs, o2)}
            p2.wait()
            if rank == 0:
                torch.save(ref, work / "ref.pt")
                (work / "paths.json").write_text(json.dumps([p1, p2]))
            if mode == "kill":
                if rank == 2:  # dies in the middle of the next save, before its file is written
                    import flightlog.checkpoint.dcp as fdcp
                    fdcp.StorageWriter.write_data = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
                p3 = tracker.save_checkpoint(fs, 2, 3 * n, o2, async_save=True)
                (work / "p3").write_text(p3)
                try:
                    p3.wait()
                    sys.stdout.write(f"P3 SAVED {rank}\\n"); sys.stdout.flush()
                except CheckpointError:
                    sys.stdout.write(f"P3 FAILED {rank}\\n"); sys.stdout.flush()
        else:
            p1, p2 = json.loads((work / "paths.json").read_text())
            ddp = DDP(net(5))
            o1 = torch.optim.Adam(ddp.parameters(), lr=0.5)
            assert tracker.load_checkpoint(p1, ddp, o1) == (0, n)
            fs = net(6)
            fully_shard(fs)  # 2 shards now, 4 when saved: DCP reshards
            o2 = torch.optim.Adam(fs.parameters(), lr=0.5)
            assert tracker.load_checkpoint(p2, fs, o2) == (1, 2 * n)
            got = {"ddp": full(ddp, o1), "fsdp": full(fs, o2)}
            # dcp.load with flightlog's StorageReader reads what dcp.async_save wrote (p2), DCP's own planner
            plain = net(7)
            fully_shard(plain)
            msd = get_model_state_dict(plain)
            dcp.load({"model": msd}, storage_reader=StorageReader(p2))
            set_model_state_dict(plain, msd)
            plain_full = get_model_state_dict(plain, options=FULL)
            if rank == 0:
                ref = torch.load(work / "ref.pt", weights_only=True)
                same(ref, got, "state")
                same(ref["fsdp"][0], plain_full, "plain")
                assert len(ref["fsdp"][1]["state"]) == 4 and ref["fsdp"][1]["state"]["0.weight"]["step"] == n
            sys.stdout.write(f"LOADED {rank}\\n"); sys.stdout.flush()
    if mode != "kill":
        dist.barrier()  # as in test_dcp_storage: no teardown while a peer may still be in a collective
        dist.destroy_process_group()
"""


def torchrun(tmp_path: Path, nproc: int, config: dict[str, Any], mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(script),
         json.dumps(config), mode, str(tmp_path), str(N)],
        capture_output=True, text=True, timeout=200, env=env, cwd=tmp_path,
    )


def cli(*args: str, ok: bool = True) -> str:
    out = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 or not ok, out.stdout + out.stderr
    return out.stdout


def job_run(proc: subprocess.CompletedProcess[str], world: int) -> str:
    ids = {line.split()[1]: line.split()[2] for line in proc.stdout.splitlines() if line.startswith("RUN ")}
    assert len(ids) == world and len(set(ids.values())) == 1, proc.stdout + proc.stderr[-4000:]
    return next(iter(ids.values()))


def points(run_id: str) -> Counter[tuple[int, str]]:
    rows = [json.loads(line) for line in cli("runs", "export", run_id, "--format", "jsonl").splitlines()]
    return Counter((p["rank"], p["key"]) for p in rows if p["key"] in ("ddp_loss", "fsdp_loss"))


def listed(ckpt: Path, *extra: str) -> list[dict[str, Any]]:
    return json.loads(cli("ckpt", "ls", "--dir", str(ckpt), "--json", *extra))  # type: ignore[no-any-return]


def test_four_ranks_save_ddp_and_fsdp2_then_two_ranks_load_them_bit_exactly(agent: AgentProcess, base_config: dict,
                                                                           tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    config = {**base_config, "checkpointing": {"checkpoint_dir": str(ckpt), "monitor": "val_loss"}}
    proc = torchrun(tmp_path, 4, config, "save")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_id = job_run(proc, 4)
    wait_status(agent.paths, run_id, "completed")
    assert points(run_id) == {(r, k): N for r in range(4) for k in ("ddp_loss", "fsdp_loss")}
    p1, p2 = json.loads((tmp_path / "paths.json").read_text())
    assert p1 == str(ckpt / f"ckpt-{run_id}-e0000-s{N:09d}.dcp")
    rows = listed(ckpt)
    assert [(r["path"], r["epoch"], r["step"], r["state"]) for r in rows] == [(p1, 0, N, "done"), (p2, 1, 2 * N, "done")]
    assert [r["is_best"] for r in rows] == [False, True]  # val_loss 1.0 beat 2.0
    assert all(r["run_id"] == run_id and r["checksum"] and r["size"] > 0 for r in rows)
    for p in (p1, p2):
        names = sorted(f.name for f in Path(p).iterdir())
        assert METADATA_NAME in names and set(names) - {METADATA_NAME} <= {f"rank{i:05d}.safetensors.zst" for i in range(4)}
    # FSDP2: every rank holds a shard, so every rank wrote a file
    assert len(list(Path(p2).glob("rank*"))) == 4
    assert cli("ckpt", "verify", "--dir", str(ckpt)).splitlines()[-1] == "2 ok, 0 bad"
    with Registry(agent.paths.store, readonly=True) as reg:
        assert reg.entries(None) == []  # the shared directory's registry lists them, not the node's store

    proc = torchrun(tmp_path, 2, config, "load")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "LOADED 0" in proc.stdout and "LOADED 1" in proc.stdout

    # A flipped bit in a rank file: verify names it (the registry's checksums cover every rank file)
    victim = Path(p1) / "rank00000.safetensors.zst"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    victim.write_bytes(bytes(raw))
    out = cli("ckpt", "verify", "--dir", str(ckpt), ok=False)
    assert "CORRUPT" in out and "1 ok, 1 bad" in out


# --- the parts, in this process ---------------------------------------------------------------------


class _Evil:
    """Pickles to a call of os.system: what a crafted checkpoint's byte item could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_byte_item_that_is_not_plain_data_is_refused_before_dcp_unpickles_it(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from flightlog.checkpoint import StorageReader, StorageWriter
    from flightlog.proto.errors import CheckpointCorrupt

    marker = tmp_path / "ran"
    dcp.save({"note": _Evil(marker), "n": 3}, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"note": None, "n": 0}, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    (exc, _), = info.value.failures.values()
    assert isinstance(exc, CheckpointCorrupt) and "not plain data" in str(exc)
    assert not marker.exists()  # DCP's planner would have run it (torch.load with weights_only=False)
    plain = {"n": 0}
    dcp.load(plain, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    assert plain == {"n": 3}


_SEALED: bytes | None = None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_dir_on_any_metadata_bytes_raises_only_checkpoint_errors(tmp_path: Path, data: st.DataObject) -> None:
    """``flightlog ckpt verify`` reads the metadata without torch: any bytes there (resealed or not) give
    CheckpointCorrupt/CheckpointError, and never a path outside the directory."""
    import torch
    import torch.distributed.checkpoint as dcp

    from flightlog.checkpoint import StorageWriter
    from flightlog.proto.checkpoint.dcpdir import seal, verify_dir
    from flightlog.proto.errors import CheckpointError

    global _SEALED
    ck = tmp_path / "ck"
    if not ck.exists():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"w": torch.arange(64.0), "n": 1}, storage_writer=StorageWriter(ck), no_dist=True)
        _SEALED = (ck / METADATA_NAME).read_bytes()
    assert _SEALED is not None
    if data.draw(st.booleans()):
        raw = data.draw(st.binary(max_size=400))
    else:
        raw = bytearray(_SEALED)
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.sampled_from(b'0-9[]{}",:./aZ '))
        raw = bytes(raw)
    body = raw.rstrip(b"\n").rpartition(b"\n")[0] if data.draw(st.booleans()) else raw
    (ck / METADATA_NAME).write_bytes(seal(body) if data.draw(st.booleans()) else raw)
    try:
        verify_dir(ck)
    except CheckpointError:
        pass
    finally:
        (ck / METADATA_NAME).write_bytes(_SEALED)
