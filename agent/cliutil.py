"""What every ``flightlog`` command shares: where the agent's data is (``--config``, ``--data-dir``,
``--socket``, resolved one way), and how user strings reach the terminal (control and bidi characters escaped)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from flightlog.proto.config import Config, load_config
from flightlog.proto.paths import AgentPaths, resolve_paths

__all__ = ["add_location_args", "resolve_location", "printable"]

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def add_location_args(sp: argparse.ArgumentParser) -> None:
    """``--data-dir``, ``--socket`` and ``--config``: the same three on every command."""
    sp.add_argument("--data-dir", help="agent data directory (default: FLIGHTLOG_DATA_DIR, then the config's "
                                       "agent.data_dir, then ~/.local/share/flightlog)")
    sp.add_argument("--socket", help="agent socket (default: FLIGHTLOG_AGENT_SOCKET, then the config's "
                                     "agent.socket, then derived from the data directory)")
    sp.add_argument("--config", help="a flightlog YAML config (its agent section is used; relative paths in it "
                                     "follow the working directory, as they do for the trainer)")


def resolve_location(args: argparse.Namespace) -> tuple[AgentPaths, Config | None]:
    """The agent's paths as the trainer resolves them: an explicit ``--data-dir``/``--socket`` first, then
    ``FLIGHTLOG_DATA_DIR``/``FLIGHTLOG_AGENT_SOCKET``, then the config's ``agent`` section, then defaults.

    ``args.location`` is set to a phrase saying where the data directory came from (for error messages).
    """
    data_dir = getattr(args, "data_dir", None)
    sock = getattr(args, "socket", None)
    cfg: Config | None = None
    if getattr(args, "config", None):
        cfg = load_config(args.config)
    # An explicit option beats the environment: the user asked for this one; children see it too.
    if data_dir:
        os.environ["FLIGHTLOG_DATA_DIR"] = str(data_dir)
    if sock:
        os.environ["FLIGHTLOG_AGENT_SOCKET"] = str(sock)
    paths = resolve_paths(cfg.agent.data_dir if cfg else None, cfg.agent.socket if cfg else None)
    if data_dir:
        source = "--data-dir"
    elif os.environ.get("FLIGHTLOG_DATA_DIR"):
        source = "FLIGHTLOG_DATA_DIR"
    elif cfg is not None and cfg.agent.data_dir:
        source = f"agent.data_dir of {args.config}"
        if not os.path.isabs(os.path.expanduser(cfg.agent.data_dir)):
            source += f", relative to the working directory {os.getcwd()}"
    else:
        source = "the default: no --data-dir, --config or FLIGHTLOG_DATA_DIR"
    args.location = source
    return paths, cfg


def printable(text: Any) -> str:
    """``text`` with every character Python's ``repr`` would escape written as an escape (``\\n``,
    ``\\x1b``, ``\\u202e``): a run name, tag or key can then neither break a line of the output, move the
    cursor nor reverse the text after it."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        elif ch in _SHORT:
            out.append(_SHORT[ch])
        else:
            n = ord(ch)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")
    return "".join(out)
