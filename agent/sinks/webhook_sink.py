"""The webhook sink: a Slack-compatible POST (``{"text": ...}``) to the run's ``notify.webhook_url`` when the
run failed or crashed, a sink parked it, the disk fell below the floor, or a watched metric went NaN.

A sink like the others: it reads the WAL through the delivery engine, so a webhook that is down is retried
(429 and 5xx with their Retry-After) and nothing is lost; a message the endpoint refuses for good (another
4xx) is quarantined on its own. It records per run the last seq it posted, so a re-sent batch posts nothing
twice, and which keys it already said went NaN (once per key and run).

``NodeWebhookSink`` is the node's: the agent's own ``notify.webhook_url`` (its config file) hears about every
run on the node, with its own cursor and retries; a run whose webhook is that same URL is posted once, by it."""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import msgspec

from flightlog.proto.config import NotifyConfig
from flightlog.proto.errors import PermanentBackendError, RetryableBackendError
from flightlog.proto.events import Alert, Event, Metrics, RunEnd, RunStart

from ._common import RunSinkBase, group_by_run
from .base import Ack, Batch

__all__ = ["NodeWebhookSink", "WebhookSink", "notify_config", "post_json"]

log = logging.getLogger("flightlog.agent.sinks")

_TIMEOUT = 10.0
_ALERT_LEVELS = ("warning", "error", "critical")
_NOTIFY_KEYS = frozenset(f.name for f in msgspec.structs.fields(NotifyConfig))


def notify_config(*layers: Mapping[str, Any] | None) -> NotifyConfig:
    """The ``notify`` settings (later layers win; keys this agent does not know are ignored)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if isinstance(layer, Mapping):
            merged.update((k, v) for k, v in layer.items() if k in _NOTIFY_KEYS)
    try:
        return msgspec.convert(merged, NotifyConfig)
    except msgspec.ValidationError as exc:
        raise PermanentBackendError(f"the run's notify config is invalid: {exc} (fix the run's config and "
                                    "replay this sink's quarantine)") from exc


def post_json(url: str, payload: dict[str, Any], timeout: float = _TIMEOUT) -> None:
    """POST ``payload`` as JSON; the endpoint's answer mapped onto the engine's retryable / permanent."""
    if not url.startswith(("http://", "https://")):
        raise PermanentBackendError(f"notify.webhook_url {url!r} is not an http(s) URL; fix the run's config")
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "flightlog"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the scheme is checked above
            resp.read(1 << 16)
    except urllib.error.HTTPError as exc:
        where = f"webhook {_redact(url)} answered {exc.code} {exc.reason}"
        if exc.code == 429 or exc.code >= 500:
            raise RetryableBackendError(where, _retry_after(exc.headers.get("Retry-After"))) from exc
        raise PermanentBackendError(f"{where}; the message is kept in this sink's quarantine") from exc
    except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
        raise RetryableBackendError(f"webhook {_redact(url)} unreachable: {exc}") from exc


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the engine's own backoff


def _redact(url: str) -> str:
    """Slack's webhook URLs are secrets: show the host only."""
    parts = url.split("/")
    return "/".join(parts[:3]) + "/…" if len(parts) > 3 else url


class WebhookSink(RunSinkBase):
    """Sink ``webhook``: serves the runs whose config sets ``notify.webhook_url``."""

    name = "webhook"
    batch_size = 500
    quarantine_scope = "event"  # one refused message, not the run's every later one

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 notify: Mapping[str, Any] | None = None, node_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self.notify_defaults = dict(notify or {})
        self.node_url = node_url  # the node webhook's URL: posted by NodeWebhookSink, not here too

    def write(self, batch: Batch) -> Ack:
        """As every run sink, except that a refused message is not caught per run: it goes up to the engine,
        which narrows the batch down to that one event and quarantines it alone (``quarantine_scope``)."""
        delivered = 0
        for run_id, events in group_by_run(batch.events).items():
            shown, ranks = self.ranks.filter(run_id, events)
            if shown:
                self._write_run(run_id, self._start_for(run_id, shown), shown)
            self.ranks.save(run_id, ranks)
            delivered += len(events)
        return Ack(delivered=delivered)

    def settings(self, start: RunStart) -> NotifyConfig:
        run_notify = start.config.get("notify") if isinstance(start.config, dict) else None
        return notify_config(self.notify_defaults, run_notify if isinstance(run_notify, dict) else None)

    def _write_run(self, run_id: str, start: RunStart, events: list[tuple[int, Event]]) -> None:
        cfg = self.settings(start)
        if not cfg.webhook_url or (cfg.webhook_url == self.node_url and self.name == WebhookSink.name):
            return
        state = self.state_of(run_id)
        done = int(state.get("seq", -1))
        said_nan = set(state.get("nan") or [])
        for seq, ev in events:
            if seq <= done:
                continue  # posted before a crash or a re-send
            text = self.message(start, ev, cfg, said_nan)
            if text is not None:
                post_json(cfg.webhook_url, {"text": text})
                state["seq"], state["nan"] = seq, sorted(said_nan)
                self.save_state(run_id, state)  # before the next post: a retry never posts this one again

    @staticmethod
    def message(start: RunStart, ev: Event, cfg: NotifyConfig, said_nan: set[str]) -> str | None:
        """The text to post for one event, or None (most events are not news)."""
        who = f"run {start.name!r} ({start.run_id})"
        if type(ev) is RunEnd:
            if ev.status in ("failed", "crashed"):
                first = ev.error.strip().splitlines()[-1][:500] if ev.error.strip() else ""
                return f":x: flightlog: {who} {ev.status}" + (f": {first}" if first else "")
            return None
        if type(ev) is Alert:
            if ev.level in _ALERT_LEVELS:
                return f":warning: flightlog: {who}: {ev.message}"
            return None
        if type(ev) is Metrics:
            gone = [k for k, v in ev.values.items()
                    if isinstance(v, float) and math.isnan(v) and k not in said_nan
                    and any(fnmatch.fnmatchcase(k, p) for p in cfg.nan_keys)]
            if not gone:
                return None
            said_nan.update(gone)
            return f":warning: flightlog: {who}: {', '.join(gone)} went NaN at step {ev.step}"
        return None


class NodeWebhookSink(WebhookSink):
    """Sink ``node_webhook``: every run on the node posts to the agent's own ``notify.webhook_url`` (the run's
    ``notify.nan_keys`` still choose which keys' NaN is news)."""

    name = "node_webhook"

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *, url: str,
                 notify: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(state_dir, notify=notify, node_url=url, accept_all_runs=True, **kwargs)

    def settings(self, start: RunStart) -> NotifyConfig:
        return msgspec.structs.replace(super().settings(start), webhook_url=self.node_url)
