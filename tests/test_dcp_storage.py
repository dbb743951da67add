"""flightlog's torch.distributed.checkpoint storage: dcp.save / dcp.async_save / dcp.load through
flightlog.checkpoint.StorageWriter / StorageReader, in one process and under a real torchrun (gloo, CPU,
FSDP2-sharded parameters), loaded into another world size; torn, flipped and uncommitted checkpoints."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.metadata import Metadata  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict  # noqa: E402

from flightlog.checkpoint import StorageReader, StorageWriter  # noqa: E402
from flightlog.checkpoint.dcp import METADATA_NAME, decode_metadata, seal  # noqa: E402
from flightlog.proto.errors import CheckpointCorrupt, CheckpointIncomplete  # noqa: E402

# DCP warns on every no_dist call that it assumes a single process: that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
_VALID: bytes | None = None


def _model(seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    o = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(4, 8)).sum().backward()
    o.step()
    return m, o


def _state(m: Any, o: Any, step: int) -> dict[str, Any]:
    return {"model": m.state_dict(), "optim": o.state_dict(), "extra": {"step": step, "note": f"s{step}"}}


def _assert_same(a: Any, b: Any) -> None:
    """Equal nested state, tensors bit-exactly (dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _private(path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for p in path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert ".tmp-" not in p.name


def test_single_process_round_trip(tmp_path: Path) -> None:
    m, o = _model(0)
    saved = _state(m, o, 7)
    saved["mixed"] = {"bf16": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "i8": torch.arange(-3, 3, dtype=torch.int8),
                      "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 5), "view": torch.arange(20.0).reshape(4, 5)[:, 1]}
    dcp.save(saved, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == [METADATA_NAME, "rank00000.safetensors.zst"]
    _private(tmp_path / "ck")
    m2, o2 = _model(1)
    target = _state(m2, o2, 0)
    target["mixed"] = {"bf16": torch.zeros(3, 4, dtype=torch.bfloat16), "i8": torch.zeros(6, dtype=torch.int8),
                       "flag": torch.zeros(2, dtype=torch.bool), "empty": torch.ones(0, 5), "view": torch.zeros(4)}
    assert not torch.equal(target["model"]["0.weight"], saved["model"]["0.weight"])
    dcp.load(target, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    _assert_same(saved, target)  # optimizer step counters and the non-tensor extras included


def test_resave_replaces_and_checkpoint_id(tmp_path: Path) -> None:
    m, o = _model(0)
    writer = StorageWriter(tmp_path / "unused")
    dcp.save(_state(m, o, 1), storage_writer=writer, checkpoint_id=tmp_path / "a", no_dist=True)
    m2, o2 = _model(2)
    dcp.save(_state(m2, o2, 2), storage_writer=writer, checkpoint_id=tmp_path / "a", no_dist=True)
    assert not (tmp_path / "unused").exists()
    target = _state(*_model(3), 0)
    dcp.load(target, storage_reader=StorageReader(tmp_path / "a"), no_dist=True)
    _assert_same(_state(m2, o2, 2), target)
    with pytest.raises(CheckpointException):
        dcp.save(_state(m, o, 1), storage_writer=StorageWriter(tmp_path / "a", overwrite=False), no_dist=True)


def test_async_save_then_load(tmp_path: Path) -> None:
    m, o = _model(0)
    saved = _state(m, o, 5)
    fut = dcp.async_save(saved, storage_writer=StorageWriter(tmp_path / "ck", codec="zstd-bytegroup"), no_dist=True)
    fut.result()
    assert (tmp_path / "ck" / "rank00000.safetensors.zbg").is_file()
    target = _state(*_model(1), 0)
    dcp.load(target, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    _assert_same(saved, target)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_rank_file_is_corrupt_and_leaves_targets(tmp_path: Path, damage: str) -> None:
    m, o = _model(0)
    dcp.save(_state(m, o, 1), storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    f = tmp_path / "ck" / "rank00000.safetensors.zst"
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
    else:
        del raw[len(raw) * 2 // 3:]
    f.write_bytes(bytes(raw))
    m2, o2 = _model(1)
    target = _state(m2, o2, 0)
    before = {k: v.clone() for k, v in target["model"].items()}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    (exc, _), = info.value.failures.values()  # DCP reports each rank's own error
    assert isinstance(exc, CheckpointCorrupt) and "rank00000" in str(exc)
    _assert_same(before, target["model"])  # nothing of the damaged file reached a tensor


def test_missing_metadata_is_incomplete(tmp_path: Path) -> None:
    m, o = _model(0)
    dcp.save(_state(m, o, 1), storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    (tmp_path / "ck" / METADATA_NAME).unlink()  # what a save that died before finish() leaves
    with pytest.raises(CheckpointIncomplete, match="not a complete"):
        StorageReader(tmp_path / "ck")
    dcp.save(_state(m, o, 1), storage_writer=StorageWriter(tmp_path / "ok"), no_dist=True)
    with pytest.raises(CheckpointIncomplete, match="no such directory"):  # dcp.load's checkpoint_id: reset()
        dcp.load(_state(m, o, 0), storage_reader=StorageReader(tmp_path / "ok"), checkpoint_id=tmp_path / "nope",
                 no_dist=True)


def test_failed_resave_leaves_no_loadable_mix(tmp_path: Path) -> None:
    """The old metadata goes before any rank writes: a re-save that fails half-way never loads as the old
    checkpoint over some of the new files."""
    m, o = _model(0)
    dcp.save(_state(m, o, 1), storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    StorageReader(tmp_path / "ck")  # complete
    bad = {**_state(m, o, 2), "z": torch.zeros(3, dtype=torch.complex64)}  # safetensors holds no complex
    with pytest.raises(CheckpointException, match="complex64"):
        dcp.save(bad, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    with pytest.raises(CheckpointIncomplete):
        StorageReader(tmp_path / "ck")
    assert not [p for p in (tmp_path / "ck").iterdir() if ".tmp-" in p.name]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_metadata_parser_fuzz(tmp_path: Path, data: st.DataObject) -> None:
    """Any bytes in the metadata file: a Metadata or CheckpointCorrupt, nothing else; damage is caught by the
    checksum line, and with the checksum recomputed (``reseal``) the JSON schema checks see it."""
    global _VALID
    if _VALID is None:
        m, o = _model(0)
        dcp.save(_state(m, o, 1), storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
        _VALID = (tmp_path / "ck" / METADATA_NAME).read_bytes()
    raw = bytearray(_VALID)
    reseal = data.draw(st.booleans())
    if reseal:
        raw = bytearray(_VALID.rstrip(b"\n").rpartition(b"\n")[0])
    kind = data.draw(st.sampled_from(["flip", "cut", "splice", "random"]))
    if kind == "random":
        raw = bytearray(data.draw(st.binary(max_size=512)))
    elif kind == "cut":
        del raw[data.draw(st.integers(0, len(raw))):]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.sampled_from(b'0-9e[]{}",:aZ ')) if kind == "splice" else raw[i] ^ (1 << data.draw(st.integers(0, 7)))
    try:
        md = decode_metadata(seal(bytes(raw)) if reseal else bytes(raw), "fuzz")
    except CheckpointCorrupt:
        return
    assert isinstance(md, Metadata)
    assert reseal or raw == _VALID  # without a new checksum, only the intact file decodes


def test_crafted_metadata_is_corrupt(tmp_path: Path) -> None:
    m, o = _model(0)
    dcp.save(_state(m, o, 1), storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    meta = tmp_path / "ck" / METADATA_NAME
    raw = meta.read_bytes()
    body = raw.rstrip(b"\n").rpartition(b"\n")[0]
    meta.write_bytes(raw.replace(b"rank00000.safetensors.zst", b"../../etc/passwd"))  # the old checksum line
    with pytest.raises(CheckpointException, match="fails its checksum"):
        dcp.load(_state(m, o, 0), storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    meta.write_bytes(seal(body.replace(b"rank00000.safetensors.zst", b"../../etc/passwd")))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_state(m, o, 0), storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    assert "not a rank file name" in str(info.value)


_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict, StateDictOptions
    from flightlog.checkpoint import StorageWriter, StorageReader

    dist.init_process_group("gloo")
    rank, path = dist.get_rank(), sys.argv[1]

    def build(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        fully_shard(m)  # each rank holds a shard of every parameter and of its Adam state
        o = torch.optim.Adam(m.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        m(torch.randn(4, 8, generator=g)).sum().backward()
        o.step()
        o.zero_grad()
        return m, o

    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    m, o = build(0)
    msd, osd = get_state_dict(m, o)
    assert msd["0.weight"].to_local().shape == (8, 8)
    dcp.save({"model": msd, "optim": osd, "extra": {"step": 3}}, storage_writer=StorageWriter(path))
    ref = get_state_dict(m, o, options=full_opts)  # the full state on rank 0 (cpu_offload), empty elsewhere

    def shards(sd):
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t
        return {**{k: local(v).clone() for k, v in sd[0].items()},
                **{f"{k}/{n}": local(v).clone() for k, st in sd[1]["state"].items() for n, v in st.items()}}

    mine = shards((msd, osd))
    m2, o2 = build(1)
    msd2, osd2 = get_state_dict(m2, o2)
    sd = {"model": msd2, "optim": osd2, "extra": {"step": 0}}
    dcp.load(sd, storage_reader=StorageReader(path))
    set_state_dict(m2, o2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert sd["extra"] == {"step": 3}
    back = shards(get_state_dict(m2, o2))
    assert mine.keys() == back.keys() and len(mine) == 16, sorted(mine)
    assert all(torch.equal(mine[k], back[k]) and mine[k].dtype == back[k].dtype for k in mine), rank
    got = get_state_dict(m2, o2, options=full_opts)
    if rank == 0:
        assert all(torch.equal(ref[0][k], got[0][k]) for k in ref[0])
        assert all(torch.equal(ref[1]["state"][k][n], got[1]["state"][k][n])
                   for k in ref[1]["state"] for n in ref[1]["state"][k])
        torch.save(ref, path + ".ref.pt")  # the full state, for the single-process load
    sys.stdout.write(f"rank {rank} ok\\n"); sys.stdout.flush()  # one write: ranks share the pipe
    dist.barrier()  # neither rank tears gloo down while the other may still be in a collective (it aborted once)
    dist.destroy_process_group()
""")


def test_torchrun_two_ranks_then_one_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    path = tmp_path / "ck"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    assert sorted(p.name for p in path.iterdir()) == [METADATA_NAME, "rank00000.safetensors.zst",
                                                       "rank00001.safetensors.zst"]
    _private(path)

    # World size 2 -> 1: each parameter's two shards are read back into one plain tensor.
    m, o = _model(5)
    msd, osd = get_state_dict(m, o)
    sd = {"model": msd, "optim": osd, "extra": {"step": 0}}
    dcp.load(sd, storage_reader=StorageReader(path), no_dist=True)
    set_state_dict(m, o, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    ref = torch.load(f"{path}.ref.pt", weights_only=True)
    got = get_state_dict(m, o, options=StateDictOptions(full_state_dict=True))
    assert sd["extra"] == {"step": 3}
    _assert_same(ref[0], got[0])
    _assert_same(ref[1]["state"], got[1]["state"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_round_trip(tmp_path: Path) -> None:
    """CUDA tensors are copied to the host for writing, and dcp.load fills CUDA tensors in place."""
    saved = {"w": torch.randn(64, 32, device="cuda"), "h": torch.arange(10, device="cuda", dtype=torch.bfloat16)}
    dcp.async_save(saved, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True).result()
    target = {k: torch.zeros_like(v) for k, v in saved.items()}
    dcp.load(target, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    assert all(target[k].is_cuda for k in target)
    _assert_same({k: v.cpu() for k, v in saved.items()}, {k: v.cpu() for k, v in target.items()})
