"""A run's files through the agent (issue 13: a multi-user agent's runs are not readable by their owners): the
agent checks the caller (``SO_PEERCRED``) against the run's owner, opens the run's plots or a checkpoint
registered to it, and hands the open file descriptors over the control socket (SCM_RIGHTS), so that the bytes
never pass through a message and the caller gets no path into the agent's folders. Each hand-over and each
refusal is an audit entry. Client side: ``plots_via_agent`` (``flightlog plot --via-agent``) and
``fetch_checkpoint`` (``flightlog ckpt export --via-agent``)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from anyio.abc import SocketStream, UNIXSocketStream

from flightlog.proto.audit import record
from flightlog.proto.codec import frame_control
from flightlog.proto.errors import AccessDenied, FlightlogError
from flightlog.proto.events import Reply, RunFilesRequest
from flightlog.proto.names import check_run_id
from flightlog.proto.osutil import PRIVATE_FILE_MODE, make_dirs
from flightlog.proto.paths import AgentPaths

from .access import AccessPolicy, Peer, RunOwners

__all__ = ["MAX_FILES", "open_run_files", "send_reply_with_fds", "request_files", "plots_via_agent",
           "fetch_checkpoint"]

#: Descriptors handed over in one message (the kernel's SCM_MAX_FD is 253).
MAX_FILES = 64
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(error: str) -> tuple[Reply, list[int]]:
    return Reply(ok=False, error=error), []


def _checkpoint_row(store_path: Path, path: str) -> dict[str, Any] | None:
    from flightlog.proto.checkpoint.registry import Registry

    with Registry(store_path, readonly=True) as reg:
        return reg.get(os.path.abspath(path))


def _run_of(store_path: Path, ref: str) -> str:
    from .store import Store

    with Store(store_path, readonly=True) as store:
        return store.resolve_run(ref)


def open_run_files(paths: AgentPaths, policy: AccessPolicy, owners: RunOwners, peer: Peer,
                   msg: RunFilesRequest) -> tuple[Reply, list[int]]:
    """The agent's side: the reply, and the descriptors to send after it (the caller closes them)."""
    try:
        if msg.kind == "checkpoint":
            row = _checkpoint_row(paths.store, msg.path)
            if row is None or row["state"] != "done" or not row["run_id"] or os.path.isdir(row["path"]):
                return _refuse(f"{msg.path} is not a durable checkpoint file of a run in the agent's registry "
                               f"({paths.store}); `flightlog ckpt ls` lists them")
            run_id = str(row["run_id"])
            if msg.run and _run_of(paths.store, msg.run) != run_id:
                return _refuse(f"{msg.path} is a checkpoint of run {run_id}, not of {msg.run}")
        else:
            run_id, row = _run_of(paths.store, msg.run), None
    except FlightlogError as exc:
        return _refuse(str(exc))
    owner = owners.owner(run_id)
    what = f"{msg.kind} through the agent"
    obj = str(row["path"]) if row else f"run:{run_id}"
    if not policy.may_read(peer.uid, owner):
        record("access.refused", obj, "denied", data_dir=paths.data_dir, run=run_id, uid=peer.uid, pid=peer.pid,
               detail=what)
        return _refuse(str(AccessDenied(policy.read_refusal(peer.uid, run_id, owner))))
    if row is not None:
        files = [Path(row["path"])]
        action, data = "checkpoint.load", {"checksum": row["checksum"], "size": row["size"]}
    else:
        files, action, data = _plots(paths, run_id), "run.plot", {}
    fds: list[int] = []
    try:
        for f in files:
            fds.append(os.open(f, _OPEN_FLAGS))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        return _refuse(f"the agent cannot open {exc.filename}: {exc.strerror}")
    record(action, obj, data_dir=paths.data_dir, run=run_id, uid=peer.uid, pid=peer.pid,
           detail=f"{len(fds)} file(s) handed over by the agent")
    return Reply(ok=True, data={**data, "run_id": run_id, "names": [f.name for f in files], "fds": len(fds)}), fds


def _plots(paths: AgentPaths, run_id: str) -> list[Path]:
    """The run's PNGs in the agent's plot folder (what its plot service wrote), rendered now if none."""
    folder = paths.run_dir(run_id) / "plots"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        from .plots import render_plots

        pngs = sorted(render_plots(paths.store, run_id, folder))
    return pngs[:MAX_FILES]


async def send_reply_with_fds(stream: SocketStream, reply: Reply, fds: list[int]) -> None:
    """The reply frame, then one byte carrying the descriptors; they are closed here in any case."""
    try:
        await stream.send(frame_control(reply))
        if fds:
            if not isinstance(stream, UNIXSocketStream):
                raise FlightlogError("file descriptors go over a Unix socket only")
            await stream.send_fds(b"F", fds)
    finally:
        for fd in fds:
            os.close(fd)


# --- the client side ------------------------------------------------------------------------------------


def request_files(paths: AgentPaths, msg: RunFilesRequest, timeout: float = 120.0) -> tuple[dict[str, Any], list[int]]:
    """Ask the agent for a run's files; (reply data, descriptors in the order of ``data["names"]``)."""
    from flightlog.proto.control import connect

    client = connect(paths)
    if client is None:
        raise FlightlogError(f"no agent on {paths.socket} to read run {msg.run or msg.path} through; start it, or "
                             "pass --data-dir of a store you can read")
    try:
        reply, fds = client.request_fds(msg, timeout=timeout)
    finally:
        client.close()
    if not reply.ok:
        raise FlightlogError(reply.error)
    return reply.data, fds


def _copy(fd: int, dest: Path) -> None:
    """The handed-over file into ``dest``, created 0600 (never through a symlink or over a file)."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "rb") as src, os.fdopen(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def plots_via_agent(paths: AgentPaths, run: str, out_dir: Path | None) -> list[Path]:
    """The run's plots as the agent has them, copied into ``out_dir`` (default ``./plots-<run id>``)."""
    data, fds = request_files(paths, RunFilesRequest(run, "plots"))
    written: list[Path] = []
    try:
        try:
            out = out_dir or Path(f"plots-{check_run_id(data.get('run_id'))}")  # a plain name: no path in it
        except (TypeError, ValueError) as exc:
            raise FlightlogError(f"the agent on {paths.socket} answered with an unusable run id: {exc}") from None
        make_dirs(out)
        for i, (name, fd) in enumerate(zip(data["names"], fds)):
            fds[i] = -1
            if Path(name).name != name or not name.endswith(".png"):
                os.close(fd)
                raise FlightlogError(f"the agent handed over a plot named {name!r}; expected a plain *.png name")
            dest = out / name
            dest.unlink(missing_ok=True)  # a fresh render replaces the last one
            _copy(fd, dest)
            written.append(dest)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    return written


def fetch_checkpoint(paths: AgentPaths, path: str, dest: Path) -> dict[str, Any]:
    """A private copy (0600) at ``dest`` of a checkpoint registered to a run we may read; returns the reply
    data (its ``checksum`` is the registry's, for the reader to check the copy against)."""
    data, fds = request_files(paths, RunFilesRequest("", "checkpoint", os.path.abspath(path)))
    for extra in fds[1:]:
        os.close(extra)
    if len(fds) != 1:
        raise FlightlogError(f"the agent handed over {len(fds)} files for checkpoint {path}, expected one")
    _copy(fds[0], dest)
    return data
