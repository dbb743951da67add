"""``flightlog runs show RUN``: one run as a person reads it — status, config hash, git, command line,
environment, hyper-parameters and tags (``--json``: the same as data)."""
from __future__ import annotations

import json
import shlex
import time
from typing import Any

from flightlog.agent.cliutil import printable
from flightlog.agent.store import Store

__all__ = ["show_run", "run_summary"]


def run_summary(store: Store, run_id: str) -> dict[str, Any]:
    """The run's row with its capture (git, command, environment without the package list) and ranks."""
    run = store.run(run_id)
    meta = store.run_metadata(run_id)
    env = dict(meta.get("environment") or {})
    env.pop("packages", None)  # hundreds of lines: `runs export --format json` has them
    return {
        "run_id": run["run_id"], "name": run["name"], "status": run["status"], "error": run["error"] or "",
        "description": run["description"] or "", "created_at": run["created_at"], "ended_at": run["ended_at"],
        "config_hash": run["config_hash"] or "", "host": run["host"], "pid": run["pid"],
        "git": meta.get("git") or {}, "command": meta.get("command") or {}, "environment": env,
        "params": run["params"], "tags": run["tags_kv"], "ranks": store.rank_table(run_id),
    }


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _git_line(git: dict[str, Any]) -> str:
    if not git.get("commit"):
        return "not a git checkout (or git unavailable)"
    dirty = " (dirty: uncommitted changes" + (f", diff saved as {git['diff_artifact']}" if git.get("diff_artifact")
                                               else "") + ")" if git.get("dirty") else ""
    where = f" of {git['remote_url']}" if git.get("remote_url") else ""
    return f"{git['commit']} on {git.get('branch') or '(detached)'}{where}{dirty}"


def show_run(store: Store, run_id: str, *, as_json: bool) -> str:
    s = run_summary(store, run_id)
    if as_json:
        return json.dumps(s, indent=2, default=str)
    cmd = s["command"]
    env = s["environment"]
    lines = [
        f"run:         {s['run_id']}  {printable(s['name'])}",
        f"status:      {s['status']}" + (f" — {printable(s['error'].splitlines()[-1])}" if s["error"] else ""),
        f"started:     {_when(s['created_at'])}   ended: {_when(s['ended_at'])}",
        f"host:        {printable(str(s['host']))} (pid {s['pid']})",
        f"config hash: {s['config_hash'] or '-'}",
        f"git:         {printable(_git_line(s['git']))}",
        f"command:     {printable(shlex.join([str(a) for a in cmd.get('argv', [])]))}"
        + (f"   (in {printable(str(cmd['cwd']))})" if cmd.get("cwd") else ""),
        f"environment: python {env.get('python', '?')} on {printable(str(env.get('os', '?')))}, "
        f"{env.get('cpu_count', '?')} CPUs" + (f", GPUs: {env['gpus']}" if env.get("gpus") else ""),
    ]
    if s["description"]:
        lines.append(f"description: {printable(s['description'])}")
    if s["ranks"]:
        lines.append("ranks:       " + ", ".join(f"{r['rank']}: {r['status']}" for r in s["ranks"]))
    for title, items in (("hyper-parameters", s["params"]), ("tags", s["tags"])):
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  {printable(str(k))} = {printable(json.dumps(v, default=str))}"
                         for k, v in sorted(items.items()))
    return "\n".join(lines)
