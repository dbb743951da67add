"""The launcher's job identity: which run the ranks of one torchrun or srun job share, and this process's
rank and world size, read from the environment the launcher sets (no torch import, no collective)."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import NamedTuple, TypedDict

from flightlog.proto.names import check_run_id, node_name

__all__ = ["JobIdentity", "job_identity", "NodeFields", "node_fields"]

log = logging.getLogger("flightlog")


class JobIdentity(NamedTuple):
    """``run_id`` is None for a process no launcher started (it stays its own run; then the tracker treats
    it as a world of one)."""

    run_id: str | None
    rank: int
    local_rank: int
    world_size: int


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = env.get(name, "")
        if value.isascii() and value.isdigit():  # str.isdigit() is also true for '²', which int() refuses
            return int(value)
    return default


def _encoded(prefix: str, raw: str) -> str:
    """``<prefix>-<raw>`` when that can name files, else ``<prefix>-<sha256 of raw>``: the same on every rank."""
    candidate = f"{prefix}-{raw}"
    try:
        return check_run_id(candidate)
    except ValueError:
        return f"{prefix}-{hashlib.sha256(raw.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


def job_identity(env: Mapping[str, str] | None = None) -> JobIdentity:
    """The job's run id (torchrun's rendezvous id, SLURM's job and step ids) and this process's rank."""
    env = os.environ if env is None else env
    rank = _int(env, "RANK", "SLURM_PROCID", "LOCAL_RANK", default=0)
    local_rank = _int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    world = _int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    run_id: str | None = env.get("FLIGHTLOG_RUN_ID") or None
    elastic = env.get("TORCHELASTIC_RUN_ID")
    if run_id is not None:
        pass  # the user's choice wins (checked by the tracker)
    elif elastic and elastic != "none":
        run_id = _encoded("te", elastic)
    elif elastic == "none":
        # torchrun without --standalone or --rdzv-id: every such job would share the id "none".
        log.warning("flightlog: torchrun's rendezvous id is 'none' (no --rdzv-id): each rank starts its own "
                    "run; pass --rdzv-id, or set FLIGHTLOG_RUN_ID, to make the job one run")
    elif env.get("SLURM_JOB_ID"):
        run_id = _encoded("slurm", f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}")
    return JobIdentity(run_id, rank, local_rank, max(world, 1))


class NodeFields(TypedDict):
    node: str
    node_rank: int
    nodes: int
    local_world_size: int


def node_fields(env: Mapping[str, str] | None = None) -> NodeFields:
    """This process's node, for its RunStart: the name, and the launcher's node index (torchrun's
    ``GROUP_RANK``, SLURM's ``SLURM_NODEID``; 0 without one). Global rank 0 runs on node 0 under both, so the
    node of index 0 is the one whose agent creates the job's run in a shared backend."""
    env = os.environ if env is None else env
    nodes = max(1, _int(env, "GROUP_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1))
    return NodeFields(node=node_name(env), node_rank=_int(env, "GROUP_RANK", "SLURM_NODEID", default=0),
                      nodes=nodes, local_world_size=_int(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=0))
