"""`flightlog ui`: start the Streamlit app on 127.0.0.1 (a free port unless ``--port``), printing its address,
reading the data directory every other command reads (``--data-dir``, ``--config``, the environment)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from flightlog.agent.cliutil import add_location_args, resolve_location
from flightlog.proto.errors import FlightlogError

__all__ = ["add_subparser", "free_port", "streamlit_command", "HOST"]

HOST = "127.0.0.1"  # the UI edits and deletes runs: never on another interface


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def streamlit_command(port: int, data_dir: Path, sock: Path) -> list[str]:
    """The Streamlit server for the app, headless, without usage statistics or a file watcher."""
    app = Path(__file__).with_name("app.py")
    return [sys.executable, "-m", "streamlit", "run", str(app),
            "--server.address", HOST, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--server.runOnSave", "false", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal", "--theme.base", "light",
            "--", "--data-dir", str(data_dir), "--socket", str(sock)]


def _serve(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise FlightlogError("the web UI needs Streamlit: pip install 'flightlog[ui]'")
    paths, _ = resolve_location(args)
    if not paths.store.exists():
        raise FlightlogError(f"no flightlog store at {paths.store} (data directory from {args.location}); "
                             "pass --data-dir or --config of the agent the runs used")
    port = args.port or free_port()
    print(f"flightlog ui: http://{HOST}:{port}/ (data directory {paths.data_dir})", flush=True)
    cmd = streamlit_command(port, paths.data_dir, paths.socket)
    os.execv(cmd[0], cmd)  # the server is this process from now on: a signal to it stops the UI


def add_subparser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``flightlog ui`` on the command line's subcommands."""
    u = sub.add_parser("ui", help="the web interface (Streamlit) on 127.0.0.1: runs, charts, compare, agent")
    add_location_args(u)
    u.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one, printed)")
    u.set_defaults(func=_serve)
