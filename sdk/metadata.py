"""A run's identity and description: ExperimentMetadata, filled at start from the config and the
reproducibility capture (``flightlog.capture``), and the config as the agent must see it."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import msgspec

from flightlog import capture
from flightlog.proto.config import Config, config_hash, config_to_dict

__all__ = ["ExperimentMetadata", "new_metadata", "default_rank", "absolute_paths", "sinks_of", "run_metadata"]

log = logging.getLogger("flightlog")


class ExperimentMetadata(msgspec.Struct, kw_only=True):
    """What identifies and describes one run."""

    id: str
    name: str
    description: str = ""
    tags: list[str] = []
    created_at: float = 0.0
    ended_at: float | None = None
    status: str = "running"
    error: str = ""
    config: dict[str, Any] = {}
    config_hash: str = ""
    host: str = ""
    pid: int = 0
    rank: int = 0
    environment: dict[str, Any] = {}  # python, OS, host, CPU, RAM, GPUs, packages, allow-listed env vars
    git: dict[str, Any] = {}  # commit, branch, dirty, remote_url (no credentials), diff_bytes, diff_artifact
    command: dict[str, Any] = {}  # argv (secrets masked), cwd, executable
    seed: dict[str, Any] = {}  # what flightlog.seed_everything did
    total_steps: int | None = None


def new_metadata(run_id: str, name: str, cfg: Config, rank: int, description: str | None,
                 tags: list[str] | None) -> tuple[ExperimentMetadata, str]:
    """The run's metadata, capture included; and the uncommitted git diff (saved as an artifact)."""
    md = ExperimentMetadata(
        id=run_id, name=name,
        description=cfg.description if description is None else description,
        tags=list(cfg.tags if tags is None else tags),
        created_at=time.time(),
        config=capture.redact(config_to_dict(cfg)),  # secrets never reach the WAL; the hash is of the real one
        config_hash=config_hash(cfg), host=socket.gethostname(), pid=os.getpid(), rank=rank,
    )
    try:
        md.environment = capture.capture_environment()
        md.command = capture.capture_command()
        md.git, diff = capture.capture_git()
    except Exception as exc:  # capture is best effort: it must never stop a run from starting
        log.warning("flightlog: reproducibility capture incomplete: %r", exc)
        diff = ""
    md.seed = capture.last_seed()
    return md, diff


def run_metadata(md: ExperimentMetadata) -> dict[str, Any]:
    """The capture as RunStart carries it: plain data only, secrets masked."""
    info = {"environment": md.environment, "git": md.git, "command": md.command, "seed": md.seed}
    return capture.redact_capture(msgspec.to_builtins(info, enc_hook=str))


def absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as the agent must see it: relative paths resolved against this process's cwd."""
    t = dict(cfg["tracking"])
    for key in ("tensorboard_log_dir", "wandb_dir"):
        if t.get(key):
            t[key] = os.path.abspath(t[key])
    uri = t.get("mlflow_tracking_uri") or ""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        t["mlflow_tracking_uri"] = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif uri and "://" not in uri:  # a plain local path is a file store
        t["mlflow_tracking_uri"] = os.path.abspath(uri)
    c = dict(cfg["checkpointing"])
    c["checkpoint_dir"] = os.path.abspath(c["checkpoint_dir"])
    return {**cfg, "tracking": t, "checkpointing": c}


def sinks_of(cfg: Config) -> list[str]:
    t = cfg.tracking
    return ["store"] + [name for name, on in (("tensorboard", t.use_tensorboard), ("mlflow", t.use_mlflow),
                                               ("wandb", t.use_wandb), ("webhook", bool(cfg.notify.webhook_url)))
                        if on]


def default_rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0
