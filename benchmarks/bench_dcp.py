"""Sharded checkpoints of a 4-rank job (torchrun, gloo, CPU, FSDP2): flightlog's distributed checkpointer
next to torch.distributed.checkpoint's own writers, per rank, in the same run.

- blocked: how long the training loop waits in ``save(..., async_save=True)`` vs ``dcp.async_save`` with its
  default stager (FileSystemWriter), first and second save (flightlog reuses its staging copies);
- durable: a synchronous save until every rank file and the metadata are durable, vs ``dcp.save`` with
  ``FileSystemWriter`` and with ``FileSystemWriter(_extensions=[ZStandard()])``;
- size: zstd and zstd-bytegroup vs the ZStandard extension, fp32 and bf16 state;
- load into 2 ranks (resharded), files evicted from the page cache first, vs ``dcp.load`` + FileSystemReader.

    python benchmarks/bench_dcp.py [--bytes 1e9] [--quick] [--dir /path/on/disk]

``--bytes`` is the whole job's model + Adam state (fp32: 12 bytes a parameter). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WIDTH = 1024


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "registry.db")


def _evict(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from flightlog.checkpoint.distributed import DistributedCheckpointer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pg = dist.new_group(backend="gloo")
    root = Path(args.dir)
    out: dict[str, Any] = {"rank": rank}

    def build(dtype: Any, seed: int) -> tuple[Any, Any]:
        per_param = 12 if dtype == torch.float32 else 6
        layers = max(1, round(args.bytes / (per_param * WIDTH * WIDTH)))
        torch.manual_seed(seed)
        m = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)]).to(dtype)
        for layer in m:
            fully_shard(layer)
        fully_shard(m)
        o = torch.optim.Adam(m.parameters(), lr=1e-3)
        m(torch.randn(8, WIDTH, dtype=dtype)).float().pow(2).mean().backward()
        o.step()
        o.zero_grad()
        return m, o

    def timed(fn: Any) -> float:
        dist.barrier()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def dcp_state(m: Any, o: Any) -> dict[str, Any]:
        msd, osd = get_state_dict(m, o)
        return {"model": msd, "optim": osd}

    def ckpt(name: str, codec: str = "zstd") -> DistributedCheckpointer:
        return DistributedCheckpointer(root / name, run_id="bench", compression=codec, max_checkpoints=0)

    if args.worker == "save":
        m, o = build(torch.float32, 0)
        # blocked: async saves, the loop waits for the copy (flightlog: into reused buffers)
        ck = ckpt("fl_async")
        for i in (1, 2):
            t = time.perf_counter()
            pending = ck.save(m, 0, i, o, async_save=True)
            out[f"flightlog_async_blocked_{i}"] = time.perf_counter() - t
            pending.wait()
            out[f"flightlog_async_durable_{i}"] = time.perf_counter() - t
            dist.barrier()
        ck.close()
        for i in (1, 2):
            dist.barrier()
            t = time.perf_counter()
            fut = dcp.async_save(dcp_state(m, o), storage_writer=FileSystemWriter(root / f"dcp_async{i}"),
                                 process_group=pg)
            out[f"dcp_async_blocked_{i}"] = time.perf_counter() - t
            fut.result()
            out[f"dcp_async_durable_{i}"] = time.perf_counter() - t
        # durable: synchronous saves
        fl = ckpt("fl_zstd")
        out["flightlog_durable"] = timed(lambda: fl.save(m, 0, 1, o).wait())
        flb = ckpt("fl_bytegroup", "zstd-bytegroup")
        out["flightlog_bytegroup_durable"] = timed(lambda: flb.save(m, 0, 1, o).wait())
        out["dcp_fs_durable"] = timed(lambda: dcp.save(dcp_state(m, o), storage_writer=FileSystemWriter(root / "dcp_fs"),
                                                       process_group=pg))
        out["dcp_zstd_durable"] = timed(lambda: dcp.save(
            dcp_state(m, o), storage_writer=FileSystemWriter(root / "dcp_zstd", _extensions=[ZStandard()]),
            process_group=pg))
        del m, o
        mb, ob = build(torch.bfloat16, 0)
        flb16 = ckpt("fl_bf16_zstd")
        out["bf16_flightlog_durable"] = timed(lambda: flb16.save(mb, 0, 1, ob).wait())
        flbg16 = ckpt("fl_bf16_bytegroup", "zstd-bytegroup")
        out["bf16_flightlog_bytegroup_durable"] = timed(lambda: flbg16.save(mb, 0, 1, ob).wait())
        out["bf16_dcp_zstd_durable"] = timed(lambda: dcp.save(
            dcp_state(mb, ob), storage_writer=FileSystemWriter(root / "dcp_bf16_zstd", _extensions=[ZStandard()]),
            process_group=pg))
        for c in (fl, flb, flb16, flbg16):
            c.close()
        if rank == 0:
            out["sizes"] = {p.name: _dir_bytes(p) for p in sorted(root.iterdir()) if p.is_dir()}
            out["paths"] = {"fl_zstd": fl.latest(), "fl_bytegroup": flb.latest()}
    else:
        paths = json.loads(args.paths)
        m, o = build(torch.float32, 1)
        fl = DistributedCheckpointer(root / "load", run_id="bench-load")

        def evict() -> None:
            if rank == 0:
                for p in root.iterdir():
                    if p.is_dir():
                        _evict(p)
            dist.barrier()

        def dcp_load(path: Path, reader: Any) -> None:
            state = dcp_state(m, o)
            dcp.load(state, storage_reader=reader, process_group=pg)
            set_state_dict(m, o, model_state_dict=state["model"], optim_state_dict=state["optim"])

        for name in ("fl_zstd", "fl_bytegroup"):
            evict()
            out[f"load_{name}"] = timed(lambda name=name: fl.load(paths[name], m, o))  # type: ignore[misc]
        evict()
        out["load_dcp_fs"] = timed(lambda: dcp_load(root / "dcp_fs", FileSystemReader(root / "dcp_fs")))
        evict()
        out["load_dcp_zstd"] = timed(lambda: dcp_load(root / "dcp_zstd", FileSystemReader(root / "dcp_zstd")))
        fl.close()
    out["world"] = world
    Path(args.out, f"{args.worker}-rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _torchrun(nproc: int, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), __file__, *argv], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {nproc}-rank job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=float, default=1e9, help="the job's model + Adam state in bytes (fp32)")
    ap.add_argument("--quick", action="store_true", help="a 64 MB smoke run")
    ap.add_argument("--dir", help="a directory on the disk to measure (default: a temporary one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.bytes = 64e6
    if args.worker:
        _worker(args)
        return
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-dcp-"))
    work, out = base / "ckpt", base / "out"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(exist_ok=True)
    try:
        common = ["--bytes", str(args.bytes), "--dir", str(work), "--out", str(out)]
        _torchrun(4, ["--worker", "save", *common])
        saves = [json.loads((out / f"save-rank{r}.json").read_text()) for r in range(4)]
        _torchrun(2, ["--worker", "load", *common, "--paths", json.dumps(saves[0]["paths"])])
        loads = [json.loads((out / f"load-rank{r}.json").read_text()) for r in range(2)]
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    sizes = saves[0]["sizes"]

    def per_rank(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [round(r[key], 4) for r in rows]

    def worst(rows: list[dict[str, Any]], key: str) -> float:
        return max(r[key] for r in rows)

    keys = [k for k in saves[0] if isinstance(saves[0][k], float)]
    result = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "state_bytes": args.bytes, "ranks": 4, "load_ranks": 2,
        "per_rank_seconds": {k: per_rank(saves, k) for k in keys},
        "load_per_rank_seconds": {k: per_rank(loads, k) for k in loads[0] if k.startswith("load_")},
        "sizes": sizes,
        "ratios": {
            "blocked_first_vs_dcp_async_default": _ratio(worst(saves, "flightlog_async_blocked_1"),
                                                         worst(saves, "dcp_async_blocked_1")),
            "blocked_steady_vs_dcp_async_default": _ratio(worst(saves, "flightlog_async_blocked_2"),
                                                          worst(saves, "dcp_async_blocked_2")),
            "durable_vs_dcp_save_fs": _ratio(worst(saves, "flightlog_durable"), worst(saves, "dcp_fs_durable")),
            "durable_vs_dcp_save_zstd": _ratio(worst(saves, "flightlog_durable"), worst(saves, "dcp_zstd_durable")),
            "size_zstd_vs_dcp_zstd": _ratio(sizes["fl_zstd"], sizes["dcp_zstd"]),
            "size_bytegroup_vs_dcp_zstd": _ratio(sizes["fl_bytegroup"], sizes["dcp_zstd"]),
            "bf16_size_zstd_vs_dcp_zstd": _ratio(sizes["fl_bf16_zstd"], sizes["dcp_bf16_zstd"]),
            "bf16_size_bytegroup_vs_dcp_zstd": _ratio(sizes["fl_bf16_bytegroup"], sizes["dcp_bf16_zstd"]),
            "bf16_durable_bytegroup_vs_dcp_zstd": _ratio(worst(saves, "bf16_flightlog_bytegroup_durable"),
                                                         worst(saves, "bf16_dcp_zstd_durable")),
            "load_4_to_2_vs_dcp_load_fs": _ratio(worst(loads, "load_fl_zstd"), worst(loads, "load_dcp_fs")),
            "load_4_to_2_vs_dcp_load_zstd": _ratio(worst(loads, "load_fl_zstd"), worst(loads, "load_dcp_zstd")),
        },
        "goals": "blocked <= dcp.async_save's; durable <= 1.2x the ZStandard FileSystemWriter; size <= it; "
                 "bf16 byte-grouped <= 0.9x it",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
