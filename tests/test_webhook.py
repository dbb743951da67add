"""The webhook sink against a real HTTP server on 127.0.0.1 (http.server in a thread): Slack-compatible JSON
for a failed run, an alert, a metric gone NaN; a 503 is retried from the WAL and every message arrives once;
a 400 quarantines that message only. Live: a trainer whose W&B is not logged in gets "W&B parked" posted."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from conftest_backends import drive, run_events, write_wal
from test_notify import no_wandb_login  # noqa: F401 - the fixture

import flightlog
from flightlog.agent.sinks.webhook_sink import WebhookSink
from flightlog.agent.store import Store
from flightlog.proto.events import Alert, Metrics, RunEnd
from flightlog.proto.paths import AgentPaths

pytestmark = pytest.mark.timeout(180)


class Hook:
    """Records every POST body; answers the codes queued in ``fail`` first (then 200)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail: list[int] = []
        self.refuse: str | None = None  # a 400 for a text containing this
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hook.lock:
                    code = hook.fail.pop(0) if hook.fail else 200
                    if hook.refuse and hook.refuse in body.get("text", ""):
                        code = 400
                    if code == 200:
                        hook.posts.append(body)
                self.send_response(code)
                if code == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts(self) -> list[str]:
        with self.lock:
            return [p["text"] for p in self.posts]


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def test_messages_retried_once_each_and_a_refused_one_quarantined(hook: Hook, tmp_path: Path) -> None:
    events = run_events("w1", "nan run", {}, steps=50, keys=["loss"], sinks=["webhook"], end=False)
    events[0].config["notify"] = {"webhook_url": hook.url, "nan_keys": ["loss", "grad/*"]}
    t = 1.7e9 + 10
    events += [
        Metrics("w1", 50, t, {"loss": float("nan"), "acc": float("nan")}),  # acc is not watched
        Metrics("w1", 51, t, {"loss": float("nan"), "grad/w": float("nan")}),  # loss again: said once
        Alert("w1", "warning", "low disk space: 0.10 GiB free on /data", t, key="disk"),
        Alert("w1", "info", "disk space is back above the floor", t, key="disk"),
        Alert("w1", "error", "this one is refused", t),
        RunEnd("w1", "failed", t, "Traceback (most recent call last):\nValueError: diverged"),
    ]
    other = run_events("w2", "quiet run", {}, steps=5, keys=["loss"], sinks=["store"])  # not this sink's
    write_wal(tmp_path / "wal", events + other, per_record=16)
    hook.fail = [503, 503, 500]  # the first deliveries fail: the engine retries them from the WAL
    hook.refuse = "refused"
    [runner] = drive([WebhookSink(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.retries >= 3
    assert hook.texts() == [
        ":warning: flightlog: run 'nan run' (w1): loss went NaN at step 50",
        ":warning: flightlog: run 'nan run' (w1): grad/w went NaN at step 51",
        ":warning: flightlog: run 'nan run' (w1): low disk space: 0.10 GiB free on /data",
        ":x: flightlog: run 'nan run' (w1) failed: ValueError: diverged",
    ]
    assert runner.stats.quarantined_events == 1 and "400" in runner.stats.last_error
    assert "secret" not in runner.stats.last_error  # the webhook URL is a secret: only its host is shown
    with Store(tmp_path / "db.sqlite", readonly=True) as store:
        [row] = store.quarantine_rows()
    assert row["sink"] == "webhook" and row["scope"] == "event"
    # A second agent over the same WAL and state posts nothing again.
    drive([WebhookSink(tmp_path / "state")], tmp_path / "wal", tmp_path / "db2.sqlite")
    assert len(hook.texts()) == 4


def test_live_run_failed_and_wandb_parked_are_posted(hook: Hook, agent_paths: AgentPaths, tmp_path: Path,
                                                     no_wandb_login: None) -> None:  # noqa: F811
    agent = AgentProcess(agent_paths).start()
    try:
        config = {
            "tracking": {"use_wandb": True, "wandb_mode": "online", "wandb_dir": str(tmp_path / "wandb"),
                         "use_tensorboard": False},
            "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
            "agent": {"autostart": False},
            "notify": {"webhook_url": hook.url, "after_seconds": 1.0},
        }
        with pytest.raises(RuntimeError, match="diverged"):
            with flightlog.experiment_tracking("hooked", config) as t:
                t.log_metrics({"loss": 1.0}, step=0)
                t.log_metrics({"loss": float("nan")}, step=1)
                deadline = time.monotonic() + 60
                while not any("parked" in x for x in hook.texts()):  # the agent looks every 5 s
                    assert time.monotonic() < deadline, hook.texts()
                    time.sleep(0.2)
                raise RuntimeError("diverged")
        deadline = time.monotonic() + 30
        while not any("failed" in x for x in hook.texts()):
            assert time.monotonic() < deadline, hook.texts()
            time.sleep(0.2)
        texts = hook.texts()
        assert texts[0] == f":warning: flightlog: run 'hooked' ({t.run_id}): loss went NaN at step 1"
        [parked] = [x for x in texts if "parked" in x]
        assert "W&B parked the run" in parked and "API key" in parked, parked
        assert texts[-1].startswith(f":x: flightlog: run 'hooked' ({t.run_id}) failed: RuntimeError: diverged")
        assert len(texts) == 3, texts
    finally:
        agent.stop()
