"""Audit log cost, printed as JSON: the time of one ``AuditLog.append`` (µs per entry; each append takes the
flock, reads the tail, writes the line and rewrites the HMAC seal), next to a plain unchained ``O_APPEND``
JSON-line write in the same run (the floor), with and without fsync; and ``verify`` speed (entries/s).

Usage: python benchmarks/bench_audit.py [--entries 20000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from flightlog.proto.audit import AuditLog


def plain_append(path: Path, n: int, fsync: bool) -> float:
    """The floor: one JSON line per call, appended with O_APPEND, no chain, no seal, no lock."""
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, json.dumps({"seq": i, "time": time.time(), "action": "run.export", "object": f"run:r{i}"})
                 .encode() + b"\n")
        if fsync:
            os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t


def audit_append(data: Path, n: int, durable: bool) -> float:
    audit = AuditLog(data, durable=durable)
    t = time.perf_counter()
    for i in range(n):
        audit.append("run.export", f"run:r{i}", run=f"r{i}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--durable-entries", type=int, default=500, help="entries for the fsync variants")
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    args = ap.parse_args()
    n, nd = (500, 50) if args.quick else (args.entries, args.durable_entries)
    out: dict[str, object] = {"python": platform.python_version(), "entries": n, "durable_entries": nd}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        root = Path(tmp)
        plain = plain_append(root / "plain.jsonl", n, False)
        chained = audit_append(root / "a", n, False)
        plain_d = plain_append(root / "plain-d.jsonl", nd, True)
        chained_d = audit_append(root / "b", nd, True)
        t = time.perf_counter()
        verdict = AuditLog(root / "a").verify()
        verify_s = time.perf_counter() - t
        assert verdict.ok and verdict.entries == n, verdict
        size = (root / "a" / "audit.log").stat().st_size
    out.update({
        "append_us_per_entry": round(chained / n * 1e6, 1),
        "plain_append_us_per_entry": round(plain / n * 1e6, 1),
        "append_ratio_to_plain": round(chained / plain, 2),
        "durable_append_us_per_entry": round(chained_d / nd * 1e6, 1),
        "durable_plain_append_us_per_entry": round(plain_d / nd * 1e6, 1),
        "durable_ratio_to_plain": round(chained_d / plain_d, 2),
        "verify_entries_per_second": round(n / verify_s),
        "bytes_per_entry": round(size / n, 1),
    })
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
