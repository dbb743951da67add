"""`flightlog ckpt ls|show|verify|export`: the checkpoint registry and files from the command line."""
from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import Any

from flightlog.agent.cliutil import add_location_args, printable, resolve_location
from flightlog.proto.audit import record
from flightlog.proto.errors import CheckpointError, CheckpointKeyError, FlightlogError

__all__ = ["add_subparsers"]


def add_subparsers(sub: Any) -> None:
    """Add the ``ckpt`` command to the ``flightlog`` parser's subparsers."""
    c = sub.add_parser("ckpt", help="checkpoints: list, show, verify, export, rm")
    csub = c.add_subparsers(dest="ckpt_command", required=True)

    def where(sp: argparse.ArgumentParser) -> None:
        add_location_args(sp)  # the agent data directory whose store holds the registry
        sp.add_argument("--dir", help="only this checkpoint directory (a standalone one: its registry.db)")
        sp.add_argument("--registry", help="a registry database file to read instead")

    ls = csub.add_parser("ls", help="list registered checkpoints")
    where(ls)
    ls.add_argument("--all", action="store_true", help="also failed, interrupted and deleted ones")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)

    show = csub.add_parser("show", help="one checkpoint: metadata, tensors, frames")
    where(show)
    show.add_argument("path")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    verify = csub.add_parser("verify", help="verify checksums and bounds (all registered, or the given files)")
    where(verify)
    verify.add_argument("paths", nargs="*")
    depth = verify.add_mutually_exclusive_group()
    depth.add_argument("--quick", action="store_true", help="checksum and index only; do not decompress")
    depth.add_argument("--deep", action="store_true", help="decrypt and decompress every frame, and fail where "
                       "an encrypted file's key is missing (by default such a file gets the outer checksum only)")
    verify.set_defaults(func=_verify)

    export = csub.add_parser("export", help="write a plain safetensors file")
    where(export)
    export.add_argument("path")
    export.add_argument("--to", required=True, help="destination .safetensors file")
    export.add_argument("--model-only", action="store_true", help="leave out optimizer, scheduler and RNG tensors")
    export.add_argument("--via-agent", action="store_true",
                        help="have the agent hand the file over (a multi-user agent's checkpoints of a run you may "
                             "read; the default when the file is not readable)")
    export.set_defaults(func=_export)

    rm = csub.add_parser("rm", help="delete a checkpoint file and mark it deleted in the registry (audited)")
    where(rm)
    rm.add_argument("path")
    rm.set_defaults(func=_rm)


def _rm(args: argparse.Namespace) -> int:
    from flightlog.proto.checkpoint.registry import Registry
    from flightlog.proto.osutil import fsync_dir

    path = Path(args.path).absolute()
    _open_registry(args).close()  # the same checks (and errors) as every other ckpt command
    with Registry(_registry_path(args)) as reg:
        row = reg.get(str(path))
        if row is None or row["state"] != "done":
            state = row["state"] if row else "not registered"
            raise FlightlogError(f"{path} is not a durable checkpoint of this registry ({state}); `flightlog ckpt "
                                 "ls --all` lists them")
        reg.mark_deleted(str(path))
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
    record("checkpoint.delete", str(path), run=str(row.get("run_id") or ""),
           data_dir=resolve_location(args)[0].data_dir)
    print(f"deleted {path}" + (" (it was the run's best: the run has no best until its next save)"
                               if row["is_best"] else ""))
    return 0


def _registry_path(args: argparse.Namespace) -> Path:
    from flightlog.proto.checkpoint.registry import STANDALONE_NAME

    if args.registry:
        return Path(args.registry)
    if args.dir and (Path(args.dir) / STANDALONE_NAME).exists():
        return Path(args.dir) / STANDALONE_NAME
    return Path(resolve_location(args)[0].store)  # the agent's store, as every other command finds it


def _open_registry(args: argparse.Namespace) -> Any:
    from flightlog.proto.checkpoint.registry import STANDALONE_NAME, Registry

    path = _registry_path(args)
    if not path.exists():
        if args.registry:
            raise FlightlogError(f"no checkpoint registry file {path}")
        if args.dir and not Path(args.dir).is_dir():
            raise FlightlogError(f"checkpoint directory {args.dir} does not exist")
        where = (f"{Path(args.dir) / STANDALONE_NAME} (a standalone checkpointer's) does not exist, nor "
                 if args.dir else "")
        raise FlightlogError(f"no checkpoint registry: {where}the agent store {path} (data directory from "
                             f"{args.location}); pass --data-dir or --config of the agent the run used, "
                             "or --registry FILE")
    return Registry(path, readonly=True)


def _keys(args: argparse.Namespace) -> Any:
    """Checkpoint keys: the ``--config``'s checkpointing.key_* provider, else $FLIGHTLOG_CHECKPOINT_KEY."""
    from flightlog.proto.checkpoint.keys import load_keyring

    config = resolve_location(args)[1] if args.config else None
    if config is None:
        return load_keyring()
    c = config.checkpointing
    return load_keyring(key_env=c.key_env, key_file=c.key_file, key_command=c.key_command,
                        timeout=c.key_command_timeout_seconds)


def _scope(args: argparse.Namespace) -> str | None:
    return str(Path(args.dir).absolute()) if args.dir else None


def _ls(args: argparse.Namespace) -> int:
    states = ("writing", "done", "failed", "deleted") if args.all else ("done",)
    with _open_registry(args) as reg:
        rows = reg.entries(_scope(args), states)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'STATE':8} {'EPOCH':>5} {'STEP':>9} {'SIZE':>12} BEST  {'SAVED':19}  PATH / METRICS")
    for r in rows:
        saved = datetime.datetime.fromtimestamp(r["saved"] or r["created"] or 0).isoformat(timespec="seconds")
        metrics = " ".join(f"{k}={v:.6g}" for k, v in r["metrics"].items())
        print(f"{r['state']:8} {r['epoch']:>5} {r['step']:>9} {r['size'] or 0:>12} {'*' if r['is_best'] else ' ':4}"
              f"  {saved:19}  {printable(r['path'])}  {printable(metrics)}")
    return 0


def _row_for(args: argparse.Namespace, path: str) -> dict[str, Any] | None:
    try:
        with _open_registry(args) as reg:
            return reg.get(str(Path(path).absolute()))  # type: ignore[no-any-return]
    except FlightlogError:
        return None


def _show(args: argparse.Namespace) -> int:
    from flightlog.proto.checkpoint.format import decode_stored_meta
    from flightlog.proto.checkpoint.reader import CheckpointReader

    row = _row_for(args, args.path)
    with CheckpointReader(args.path, expected_checksum=row["checksum"] if row and row["state"] == "done" else None,
                          keys=_keys(args)) as r:
        meta = decode_stored_meta(r.metadata["flightlog"], r.name, r.tensors) if "flightlog" in r.metadata else {}
        info = {
            "path": str(r.path), "size": r.size, "codec": r.codec, "checksum": r.checksum, "frames": len(r.frames),
            "encryption": r.encryption, "key_id": r.key_id,
            "uncompressed": r.total, "epoch": meta.get("epoch"), "step": meta.get("step"),
            "metrics": meta.get("metrics", {}), "run_id": meta.get("run_id", ""),
            "config_hash": meta.get("config_hash", ""), "git_commit": meta.get("git_commit", ""),
            "aliases": meta.get("aliases", {}), "registry": row,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.end - t.begin}
                        for t in sorted(r.tensors.values(), key=lambda t: t.begin)],
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    sealed = f", {info['encryption']} (key {info['key_id']})" if info["encryption"] != "none" else ""
    print(f"{info['path']}: {info['codec']}{sealed}, {info['size']} bytes ({info['uncompressed']} uncompressed, "
          f"{info['frames']} frames), {info['checksum']}")
    print(f"epoch {info['epoch']}, step {info['step']}, metrics {info['metrics']}, run {info['run_id']}, "
          f"git {info['git_commit'] or '-'}")
    if row:
        print(f"registry: {row['state']}{', best' if row['is_best'] else ''}")
    for t in info["tensors"]:
        print(f"  {t['name']:48} {t['dtype']:6} {str(t['shape']):24} {t['bytes']:>12}")
    for alias, target in info["aliases"].items():
        print(f"  {alias:48} -> {target}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from flightlog.proto.checkpoint.dcpdir import verify_dir

    keys = _keys(args)
    if args.paths:
        targets = [(p, (_row_for(args, p) or {}).get("checksum")) for p in args.paths]
    else:
        with _open_registry(args) as reg:
            targets = [(r["path"], r["checksum"]) for r in reg.entries(_scope(args))]
    bad = 0
    for path, checksum in targets:
        try:
            if os.path.isdir(path):  # a distributed checkpoint: its metadata, then each rank file against it
                verify_dir(path, checksum, deep=not args.quick)
                note = ""
            else:
                note = _verify_one(path, checksum, args, keys)
            print(f"OK       {path}{note}")
        except CheckpointKeyError as exc:
            bad += 1
            print(f"NO KEY   {path}: {_reason(exc, path)}")
        except CheckpointError as exc:
            bad += 1
            print(f"CORRUPT  {path}: {_reason(exc, path)}")
    print(f"{len(targets) - bad} ok, {bad} bad")
    return 1 if bad else 0


def _verify_one(path: str, checksum: str | None, args: argparse.Namespace, keys: Any) -> str:
    """Verify one file as :func:`verify_file` does; an encrypted file with no key here gets the outer
    checks only (unless --deep), which the returned note says."""
    from flightlog.proto.checkpoint.format import decode_stored_meta
    from flightlog.proto.checkpoint.reader import CheckpointReader

    with CheckpointReader(path, expected_checksum=checksum, keys=keys, need_key=args.deep) as r:
        if r.locked:
            return (f" (outer checksum only: encrypted with key id {r.key_id!r}, which has no key here; "
                    "--deep needs it)")
        if "flightlog" in r.metadata:
            decode_stored_meta(r.metadata["flightlog"], r.name, r.tensors)
        if not args.quick:
            r.check_frames()
    return ""


def _reason(exc: CheckpointError, path: str) -> str:
    """The error without the path it starts with (the line already names the file)."""
    text = str(exc)
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _export(args: argparse.Namespace) -> int:
    if args.via_agent or not os.access(args.path, os.R_OK):
        return _export_via_agent(args)
    row = _row_for(args, args.path)
    record("checkpoint.export", args.path, run=str(row.get("run_id") or "") if row else "",
           data_dir=resolve_location(args)[0].data_dir, detail=f"to {args.to}")
    return _write_export(args, args.path, row["checksum"] if row and row["state"] == "done" else None)


def _export_via_agent(args: argparse.Namespace) -> int:
    """A checkpoint we cannot open (a multi-user agent's): the agent hands it over if its run is ours to read;
    a private copy next to ``--to`` is read with our keys (the agent never decrypts for us), then removed."""
    from flightlog.agent.fdpass import fetch_checkpoint

    copy = Path(args.to).absolute().with_name(f".{Path(args.to).name}.{os.getpid()}.fetch")
    try:
        data = fetch_checkpoint(resolve_location(args)[0], args.path, copy)
        return _write_export(args, str(copy), data.get("checksum"))
    finally:
        copy.unlink(missing_ok=True)


def _write_export(args: argparse.Namespace, source: str, checksum: str | None) -> int:
    from flightlog.proto.checkpoint.reader import CheckpointReader

    with CheckpointReader(source, expected_checksum=checksum, keys=_keys(args)) as r:
        if args.model_only:  # the JSON state refers to the optimizer tensors left out: keep only the basics
            names = [n for n in r.tensors if not n.startswith("@")]
            r.export(args.to, names, {k: v for k, v in r.metadata.items() if k != "flightlog"})
        else:
            r.export(args.to)
        plain = f"; decrypted: it holds key {r.key_id!r}'s plaintext" if r.encryption != "none" else ""
    print(f"wrote {args.to} ({os.path.getsize(args.to)} bytes{plain})")
    return 0
