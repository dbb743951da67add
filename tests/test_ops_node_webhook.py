"""The node's webhook: ``notify.webhook_url`` in the agent's own config file posts for every run on the node
(failed, a metric gone NaN, disk below the floor), a run without any webhook of its own included, retried
from the WAL when the endpoint answers 503; a run whose own webhook is the same URL is posted once; a run
with another URL gets both. A real agent process and a local http.server."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import AgentProcess

import flightlog
from flightlog.proto.config import NotifyConfig
from flightlog.proto.control import connect
from flightlog.proto.events import StatusRequest
from flightlog.proto.paths import AgentPaths

pytestmark = pytest.mark.timeout(150)


class PathHook:
    """Records each POST's text under its path; answers the codes queued per path in ``fail`` first."""

    def __init__(self) -> None:
        self.posts: dict[str, list[str]] = {}
        self.fail: dict[str, list[int]] = {}
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hook.lock:
                    hook.attempts[self.path] += 1
                    queued = hook.fail.get(self.path) or []
                    code = queued.pop(0) if queued else 200
                    if code == 200:
                        hook.posts.setdefault(self.path, []).append(body["text"])
                self.send_response(code)
                if code == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts(self, path: str) -> list[str]:
        with self.lock:
            return list(self.posts.get(path, []))


@pytest.fixture
def path_hook() -> Iterator[PathHook]:
    h = PathHook()
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def _wait(what: Callable[[], bool], why: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.1)


def _config(tmp_path: Path, name: str, notify: dict[str, Any] | None = None, floor: int = 0) -> dict[str, Any]:
    return {
        "tracking": {"use_tensorboard": False},
        "checkpointing": {"checkpoint_dir": str(tmp_path / name)},
        "monitoring": {"log_gpu_usage": False, "log_memory_usage": False, "create_plots": False,
                       "disk_free_floor_bytes": floor},
        "agent": {"autostart": False},
        "notify": {"after_seconds": 3600.0, **(notify or {})},
    }


def _caught_up(paths: AgentPaths) -> bool:
    client = connect(paths, timeout=5.0)
    assert client is not None
    try:
        sinks = client.request(StatusRequest(), timeout=10.0).data["sinks"]
    finally:
        client.close()
    return all(sinks[s]["backlog_events"] == 0 for s in ("webhook", "node_webhook"))


def test_node_webhook_posts_for_every_run_once(path_hook: PathHook, agent_paths: AgentPaths,
                                               tmp_path: Path) -> None:
    node, own = f"{path_hook.base}/node", f"{path_hook.base}/own"
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text(f"notify:\n  webhook_url: {node}\n")
    path_hook.fail["/node"] = [503, 503, 500]  # the node's first posts fail: retried from the WAL
    agent = AgentProcess(agent_paths, ["--config", str(agent_yaml)]).start()
    try:
        same = flightlog.ExperimentTracker("same-url", _config(tmp_path, "s", {"webhook_url": node}))
        same.log_metrics({"loss": float("nan")}, step=0)
        same.finish()
        other = flightlog.ExperimentTracker("own-url", _config(tmp_path, "o", {"webhook_url": own}))
        other.log_metrics({"loss": float("nan")}, step=3)
        other.finish()
        with pytest.raises(RuntimeError, match="boom"):
            # No webhook in this run's config; a disk floor no disk meets: the agent's monitor alerts.
            with flightlog.experiment_tracking("plain", _config(tmp_path, "p", floor=1 << 60)) as plain:
                plain.log_metrics({"loss": 1.0, "acc": float("nan")}, step=7)
                _wait(lambda: any("'plain'" in x and "low disk space" in x for x in path_hook.texts("/node")),
                      lambda: path_hook.posts)
                raise RuntimeError("boom")
        _wait(lambda: any("'plain'" in x and "failed" in x for x in path_hook.texts("/node")),
              lambda: path_hook.posts)
        _wait(lambda: _caught_up(agent_paths), lambda: path_hook.posts)
        texts = path_hook.texts("/node")
        assert path_hook.attempts["/node"] == len(texts) + 3
        assert max(Counter(texts).values()) == 1, texts  # nothing posted twice, whatever the retries
        assert f":warning: flightlog: run 'same-url' ({same.run_id}): loss went NaN at step 0" in texts
        assert f":warning: flightlog: run 'own-url' ({other.run_id}): loss went NaN at step 3" in texts
        assert f":warning: flightlog: run 'plain' ({plain.run_id}): acc went NaN at step 7" in texts
        assert f":x: flightlog: run 'plain' ({plain.run_id}) failed: RuntimeError: boom" in texts
        # The run's own webhook: only the run with another URL; the one naming the node's URL is posted once.
        assert path_hook.texts("/own") == [f":warning: flightlog: run 'own-url' ({other.run_id}): loss went NaN "
                                           "at step 3"]
        assert sum("same-url" in x for x in texts) == 1
    finally:
        agent.stop()


def test_webhook_url_must_be_http() -> None:
    with pytest.raises(msgspec.ValidationError, match="webhook_url: not an http"):
        msgspec.convert({"webhook_url": "hooks.slack.com/x"}, NotifyConfig)
    assert msgspec.convert({"webhook_url": "https://h/x"}, NotifyConfig).webhook_url == "https://h/x"
