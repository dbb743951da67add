"""Who may use the agent and read a run. The peer's uid comes from the control socket (``SO_PEERCRED``): a
single-user agent serves its own user and root; a multi-user one (``flightlog agent --multi-user``, run as a
service account) serves everybody, records which uid registered each run, and lets a run be read only by its
owner, members of ``access.group`` and root. Every refusal and every read is an audit entry."""
from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flightlog.proto.audit import record
from flightlog.proto.errors import AccessDenied, FlightlogError
from flightlog.proto.events import Reply, RunExportRequest
from flightlog.proto.osutil import PRIVATE_FILE_MODE

__all__ = ["Peer", "peer_of", "AccessPolicy", "RunOwners", "user_in_group", "export_run"]

OWNERS_FILE = "run_owners.json"


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a control connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(int(pid), int(uid), int(gid))


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def user_in_group(uid: int, group: str) -> bool:
    """True when ``uid`` belongs to ``group``: as its primary group or as a listed member."""
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return False
    return pw.pw_gid == g.gr_gid or pw.pw_name in g.gr_mem


class AccessPolicy:
    """The decisions, as plain functions of uids (the agent's own uid injectable for tests)."""

    def __init__(self, *, multi_user: bool = False, group: str | None = None, own_uid: int | None = None) -> None:
        self.multi_user = multi_user
        self.group = group
        self.own_uid = os.getuid() if own_uid is None else own_uid

    def may_connect(self, uid: int) -> bool:
        return self.multi_user or uid in (self.own_uid, 0)

    def may_read(self, uid: int, owner: int | None) -> bool:
        if uid in (0, self.own_uid) or (owner is not None and uid == owner):
            return True
        return owner is not None and self.group is not None and user_in_group(uid, self.group)

    def may_write_for(self, uid: int) -> bool:
        """Files the agent writes where the peer says (checkpoints, from a staging file the peer names) are
        written as the agent's uid: only for itself and root. Another uid's trainer writes its own."""
        return uid in (self.own_uid, 0)

    def write_refusal(self, uid: int) -> str:
        return (f"uid {uid} may not have this agent (uid {self.own_uid}) write checkpoints: it would write them "
                "as its own user, at a path and from a staging file you name; the SDK writes them in your "
                "process when the agent is another user's (update flightlog, or use ModelCheckpointer directly)")

    def connect_refusal(self, uid: int) -> str:
        return (f"uid {uid} may not use this agent: it serves uid {self.own_uid} only; ask its owner to run "
                "a node-wide agent (`flightlog agent --multi-user`) or start your own")

    def read_refusal(self, uid: int, run_id: str, owner: int | None) -> str:
        whose = f"{_name(owner)} (uid {owner})" if owner is not None else "no recorded owner"
        how = f"members of group {self.group!r}, " if self.group else ""
        return (f"{_name(uid)} (uid {uid}) may not read run {run_id}: it belongs to {whose}; only its owner, "
                f"{how}and root may (its owner can share it through access.group)")


class RunOwners:
    """``<data dir>/run_owners.json``: run id -> the uid that registered it first (a claim by another uid
    later is refused). Small: one line per run; rewritten through a rename on each new run."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / OWNERS_FILE
        self._lock = threading.Lock()
        self._owners: dict[str, int] = {}
        try:
            raw = json.loads(self.path.read_bytes()[: 64 << 20])
            if isinstance(raw, dict):
                self._owners = {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}
        except (OSError, ValueError):
            pass

    def owner(self, run_id: str) -> int | None:
        return self._owners.get(run_id)

    def claim(self, run_id: str, uid: int) -> int:
        """Record ``uid`` as the owner of ``run_id`` unless it has one; returns the owner."""
        with self._lock:
            have = self._owners.get(run_id)
            if have is not None:
                return have
            self._owners[run_id] = uid
            tmp = self.path.with_name(OWNERS_FILE + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         PRIVATE_FILE_MODE)
            try:
                os.write(fd, json.dumps(self._owners).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            return uid


def export_run(store_path: Path, data_dir: Path, policy: AccessPolicy, owners: RunOwners, peer: Peer,
               msg: RunExportRequest) -> Reply:
    """``flightlog runs export`` through the agent, for a peer that cannot read the store itself."""
    from .store import Store

    try:
        store = Store(store_path, readonly=True)
    except FlightlogError as exc:
        return Reply(ok=False, error=f"the agent cannot open its store {store_path}: {exc}")
    try:
        try:
            run_id = store.resolve_run(msg.run)
        except FlightlogError as exc:
            return Reply(ok=False, error=str(exc))
        owner = owners.owner(run_id)
        if not policy.may_read(peer.uid, owner):
            error = policy.read_refusal(peer.uid, run_id, owner)
            record("access.refused", f"run:{run_id}", "denied", data_dir=data_dir, run=run_id, uid=peer.uid,
                   pid=peer.pid, detail="run export through the agent")
            return Reply(ok=False, error=str(AccessDenied(error)))
        if msg.key is not None and msg.key not in store.metric_keys(run_id):
            return Reply(ok=False, error=f"run {run_id} has no metric {msg.key!r}")
        run: dict[str, Any] = store.run(run_id)
        run["ranks"] = store.rank_table(run_id)
        run["metrics"] = list(store.metric_points(run_id, msg.key))
    finally:
        store.close()
    record("run.export", f"run:{run_id}", data_dir=data_dir, run=run_id, uid=peer.uid, pid=peer.pid,
           detail="through the agent")
    return Reply(ok=True, data=json.loads(json.dumps(run, default=str)))
