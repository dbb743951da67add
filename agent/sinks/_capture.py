"""A run's reproducibility capture (git, command line, environment: RunStart.metadata) in the shapes the
backends show it: MLflow's own ``mlflow.source.*`` tags, W&B's config and settings."""
from __future__ import annotations

import os
import shlex
from typing import Any

from flightlog.proto.events import RunStart

__all__ = ["mlflow_source_tags", "capture_document", "wandb_capture"]


def _parts(start: RunStart) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    meta = start.metadata or {}

    def part(key: str) -> dict[str, Any]:
        value = meta.get(key)
        return value if isinstance(value, dict) else {}

    return part("git"), part("command"), part("environment")


def _program(command: dict[str, Any]) -> str:
    argv = command.get("argv") or []
    if not argv or not isinstance(argv[0], str) or argv[0] in ("-c", "-m", ""):
        return ""
    return os.path.join(str(command.get("cwd") or ""), argv[0])  # join keeps an absolute argv[0] as it is


def _command_line(command: dict[str, Any]) -> str:
    return shlex.join(str(a) for a in command.get("argv") or [])


def mlflow_source_tags(start: RunStart, limit: int) -> dict[str, str]:
    """The tags MLflow's UI shows as the run's source and git commit (what ``mlflow.start_run`` sets from the
    caller's process; here the trainer's capture, since the agent runs elsewhere), plus flightlog's own."""
    git, command, env = _parts(start)
    tags = {"mlflow.source.type": "LOCAL"}
    if git.get("commit"):
        tags["mlflow.source.git.commit"] = str(git["commit"])
        tags["flightlog.git.dirty"] = "true" if git.get("dirty") else "false"
    if git.get("branch"):
        tags["mlflow.source.git.branch"] = str(git["branch"])
    if git.get("remote_url"):
        tags["mlflow.source.git.repoURL"] = str(git["remote_url"])
    if program := _program(command):
        tags["mlflow.source.name"] = program
    if command.get("argv"):
        tags["flightlog.command"] = _command_line(command)
    if env.get("python"):
        tags["flightlog.python"] = str(env["python"])
    return {k: v[:limit] for k, v in tags.items()}


def capture_document(start: RunStart) -> dict[str, Any]:
    """The whole capture (packages included), uploaded as the artifact ``flightlog/capture.json``."""
    git, command, env = _parts(start)
    return {"run_id": start.run_id, "git": git, "command": command, "environment": env,
            "seed": (start.metadata or {}).get("seed") or {}}


def wandb_capture(start: RunStart) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config entries, Settings fields) for ``wandb.init``: git and command in the run's config under
    ``flightlog``, and the git commit/remote and program as W&B's own settings."""
    git, command, env = _parts(start)
    config = {
        "git": {k: git.get(k) for k in ("commit", "branch", "dirty", "remote_url") if git.get(k) is not None},
        "command": _command_line(command), "cwd": command.get("cwd") or "",
        "python": env.get("python") or "", "os": env.get("os") or "", "host": start.host,
    }
    settings: dict[str, Any] = {}
    if git.get("commit"):
        settings["git_commit"] = str(git["commit"])
    if git.get("remote_url"):
        settings["git_remote_url"] = str(git["remote_url"])
    if program := _program(command):
        settings["program"] = program
    return config, settings
