"""``flightlog runs rm RUN [--yes]``: delete an ended run from the local store (the UI's deletion,
``ui.queries.delete_run``), asked for first and audited; through a multi-user agent for its owner, members of
``access.group`` and root."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flightlog.proto.audit import record
from flightlog.proto.errors import AccessDenied, FlightlogError
from flightlog.proto.events import Reply, RunDeleteRequest

from .access import AccessPolicy, Peer, RunOwners
from .cliutil import resolve_location

__all__ = ["delete_audited", "serve_delete", "runs_rm", "add_subparser"]


def delete_audited(store_path: Path, data_dir: Path, ref: str, *, uid: int | None = None, pid: int | None = None,
                   how: str = "", allowed: tuple[AccessPolicy, RunOwners] | None = None) -> tuple[str, int]:
    """Resolve ``ref`` and delete that run's rows, with one ``run.delete`` audit entry whatever the outcome;
    returns (run id, rows deleted). ``allowed``: the agent's policy and owners, checked before anything goes."""
    from .store import Store
    from .ui.queries import delete_run

    store = Store(store_path)
    try:
        run_id = store.resolve_run(ref)
        if allowed is not None:
            policy, owners = allowed
            owner = owners.owner(run_id)
            if uid is not None and not policy.may_read(uid, owner):
                record("access.refused", f"run:{run_id}", "denied", data_dir=data_dir, run=run_id, uid=uid, pid=pid,
                       detail="run deletion through the agent")
                raise AccessDenied(policy.read_refusal(uid, run_id, owner).replace("may not read", "may not delete"))
        try:
            rows = sum(delete_run(store, run_id).values())
        except FlightlogError as exc:
            record("run.delete", f"run:{run_id}", "refused", data_dir=data_dir, run=run_id, uid=uid, pid=pid,
                   detail=f"{exc}{how}")
            raise
    finally:
        store.close()
    record("run.delete", f"run:{run_id}", data_dir=data_dir, run=run_id, uid=uid, pid=pid,
           detail=f"{rows} rows{how}")
    return run_id, rows


def serve_delete(store_path: Path, data_dir: Path, policy: AccessPolicy, owners: RunOwners, peer: Peer,
                 msg: RunDeleteRequest) -> Reply:
    """The agent's side of ``runs rm`` for a peer that cannot write its store."""
    try:
        run_id, rows = delete_audited(store_path, data_dir, msg.run, uid=peer.uid, pid=peer.pid,
                                      how=", through the agent", allowed=(policy, owners))
    except FlightlogError as exc:
        return Reply(ok=False, error=str(exc))
    return Reply(ok=True, data={"run_id": run_id, "rows": rows})


def _confirmed(ref: str, store: Path) -> bool:
    print(f"delete run {ref} from {store}? Its metrics, parameters, tags and artifact rows go; the WAL and "
          "checkpoint files stay. [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):  # no stdin at all
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def runs_rm(args: argparse.Namespace) -> int:
    from flightlog.proto.control import connect

    paths = resolve_location(args)[0]
    if not args.yes and not _confirmed(args.run, paths.store):
        raise FlightlogError(f"run {args.run} not deleted: not confirmed (answer y, or pass --yes)")
    mine = paths.store.exists() and os.access(paths.store, os.R_OK | os.W_OK)
    if mine and not args.via_agent:
        run_id, rows = delete_audited(paths.store, paths.data_dir, args.run)
    else:  # a multi-user agent's store is not ours to write: it deletes for us if the run is ours to read
        client = connect(paths)
        if client is None:
            raise FlightlogError(f"no store of ours at {paths.store} and no agent on {paths.socket} to delete run "
                                 f"{args.run} through; pass --data-dir of the store, or start the agent")
        try:
            reply = client.request(RunDeleteRequest(args.run), timeout=120)
        finally:
            client.close()
        if not reply.ok:
            raise FlightlogError(reply.error)
        run_id, rows = str(reply.data["run_id"]), int(reply.data["rows"])
    print(f"deleted run {run_id} ({rows} rows)")
    return 0


def add_subparser(rsub: Any, common: Callable[[argparse.ArgumentParser], object]) -> None:
    """``flightlog runs rm`` on the ``runs`` subparsers; ``common`` adds the location options."""
    rm = rsub.add_parser("rm", help="delete an ended run from the store (asks first; audited)")
    common(rm)
    rm.add_argument("run", help="run id, id prefix or name")
    rm.add_argument("--yes", action="store_true", help="do not ask")
    rm.add_argument("--via-agent", action="store_true",
                    help="ask the agent to delete it (a multi-user agent's runs; the default when the store is not "
                         "writable)")
    rm.set_defaults(func=runs_rm)
