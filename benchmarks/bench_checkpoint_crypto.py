"""Encrypted checkpoints next to unencrypted ones, in the same run: time until durable, full load (hot:
file in the page cache; cold: evicted first) and the blocked part of a save, with their ratios.

    python benchmarks/bench_checkpoint_crypto.py [--params 90_000_000] [--repeat 3] [--codec zstd] [--dir /disk]
    python benchmarks/bench_checkpoint_crypto.py --quick      # a small smoke size

The default is the 1 GiB state of benchmarks/checkpoint.py (88 M fp32 parameters + Adam moments). Saves and
loads of the two alternate (each goes first in turn), so drift in the machine's load hits both alike.
Also reported: one core's AES-256-GCM speed (``cryptography``'s AESGCM; before version 50 it holds the GIL while it
works, so sealing runs on one core at a time while zstd runs on all), and zstd's, for the reader to see
which one bounds the encrypted figures. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flightlog.checkpoint import ModelCheckpointer
from flightlog.proto.checkpoint.keys import Key, KeyRing

MODES = ("none", "aes-256-gcm")


def _model(params: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 2048 if params >= 2048 * 2048 else 256
    layers = max(1, params // (width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(4, width)
    for _ in range(2):  # real Adam moments, not zeros
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _one_core_rates(sample: torch.Tensor, codec: str) -> dict[str, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from flightlog.proto.checkpoint.codecs import compress_chunk

    chunks = [memoryview(sample.numpy())[o:o + (8 << 20)] for o in range(0, sample.numel(), 8 << 20)]
    aead = AESGCM(os.urandom(32))
    out = bytearray((8 << 20) + 16)
    t = time.perf_counter()
    for c in chunks:
        aead.encrypt_into(os.urandom(12), c, b"aad", memoryview(out)[:len(c) + 16])
    aes = sample.numel() / (time.perf_counter() - t)
    t = time.perf_counter()
    for c in chunks:
        compress_chunk(codec if codec != "none" else "zstd", 1, c)
    z = sample.numel() / (time.perf_counter() - t)
    return {"aes_256_gcm_MBps_one_core": aes / 1e6, "zstd1_compress_MBps_one_core": z / 1e6}


def bench(root: Path, params: int, repeat: int, codec: str) -> dict[str, Any]:
    model, opt = _model(params)
    target_m, target_o = _model(params)
    ring = KeyRing([Key("bench", os.urandom(32))])
    cks = {m: ModelCheckpointer(root / m, max_checkpoints=2, compression=codec, encryption=m, keys=ring,
                                staging_dir=root / f"stage-{m}", monitor=None) for m in MODES}
    blocked: dict[str, list[float]] = {m: [] for m in MODES}
    durable: dict[str, list[float]] = {m: [] for m in MODES}
    hot: dict[str, list[float]] = {m: [] for m in MODES}
    cold: dict[str, list[float]] = {m: [] for m in MODES}
    sizes: dict[str, int] = {}
    paths: dict[str, str] = {}
    try:
        for i in range(repeat + 1):  # the first round creates and pre-faults the staging buffers: not counted
            for m in (MODES if i % 2 else MODES[::-1]):  # each goes first in turn
                for ck in cks.values():  # the encrypted side re-stages its buffer after each write: not now
                    ck.wait_all()
                t = time.perf_counter()
                pending = cks[m].save(model, 0, i, opt, val_loss=1.0)
                b = time.perf_counter() - t
                meta = pending.wait()
                d = time.perf_counter() - t
                if i:
                    blocked[m].append(b)
                    durable[m].append(d)
                sizes[m], paths[m] = meta.size, meta.path
        for m in MODES:
            cks[m].wait_all()
            cks[m].load(paths[m], target_m, target_o)  # written with O_DIRECT: warm the page cache once
        for i in range(repeat):
            order = MODES if i % 2 else MODES[::-1]
            for m in order:
                t = time.perf_counter()
                cks[m].load(paths[m], target_m, target_o)
                hot[m].append(time.perf_counter() - t)
            for m in order:
                _evict(Path(paths[m]))
                t = time.perf_counter()
                cks[m].load(paths[m], target_m, target_o)
                cold[m].append(time.perf_counter() - t)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), target_m.parameters()))
    finally:
        for ck in cks.values():
            ck.close()
    state = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # + two Adam moments
    sample = torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in model.parameters()])[:64 << 20]
    out: dict[str, Any] = {"codec": codec, "state_bytes": state, "repeat": repeat}
    for m in MODES:
        tag = "plain" if m == "none" else "encrypted"
        out[f"{tag}_file_bytes"] = sizes[m]
        out[f"{tag}_save_blocked_s"] = statistics.median(blocked[m])
        out[f"{tag}_time_to_durable_s"] = statistics.median(durable[m])
        out[f"{tag}_load_hot_s"] = statistics.median(hot[m])
        out[f"{tag}_load_cold_s"] = statistics.median(cold[m])
    for what in ("save_blocked", "time_to_durable", "load_hot", "load_cold"):
        out[f"{what}_ratio"] = out[f"encrypted_{what}_s"] / out[f"plain_{what}_s"]
    out.update(_one_core_rates(sample, codec))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=90_000_000, help="model parameters (fp32; Adam triples the state)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--codec", default="zstd", help="checkpointing.compression for both sides")
    ap.add_argument("--dir", help="a directory on the disk to measure (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a small smoke size (4 M parameters, 2 repeats)")
    args = ap.parse_args()
    params, repeat = (4_000_000, 2) if args.quick else (args.params, args.repeat)
    root = Path(tempfile.mkdtemp(prefix="fl-crypt-", dir=args.dir))
    try:
        result = bench(root, params, repeat, args.codec)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import cryptography

    result.update(cpus=os.cpu_count(), machine=platform.machine(), python=platform.python_version(),
                  torch=torch.__version__, cryptography=cryptography.__version__, quick=args.quick)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
