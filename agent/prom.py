"""The agent's Prometheus endpoint (``agent.metrics_address``, off by default): ``/metrics`` computed at each
scrape from counters the agent keeps anyway, so nothing is added to ingest or delivery but one clock read
and a few samples per delivered batch (the latency histogram)."""
from __future__ import annotations

import bisect
import logging
import socket
import threading
import time
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio

from flightlog.proto.config import parse_address
from flightlog.proto.errors import ConfigError

from .sinks.base import Ack, Batch, SinkCursor

if TYPE_CHECKING:
    from .daemon import Agent

__all__ = ["LATENCY_BUCKETS", "LatencyHistogram", "MetricsServer", "TimedSink", "AgentCollector"]

log = logging.getLogger("flightlog.agent")

#: Seconds from the log call to the backend's ack; the batching window (agent.linger_ms, 300 ms) sits in the middle.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_SAMPLES = 16  # events per batch whose latency is measured; each stands for its share of the batch
_STATES = ("starting", "ok", "retrying", "open circuit", "given up")


class LatencyHistogram:
    """Bucket counts and a sum, updated under a lock from any thread (cheaper than prometheus-client's
    Histogram per event: a batch costs ``_SAMPLES`` bisects)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket (+Inf)
        self.total = 0.0
        self.n = 0
        self._lock = threading.Lock()

    def observe(self, value: float, weight: int = 1) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self.counts[i] += weight
            self.total += value * weight
            self.n += weight

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` pairs as Prometheus wants them, and the sum."""
        with self._lock:
            counts, total = list(self.counts), self.total
        out, acc = [], 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], counts):
            acc += c
            out.append((le, float(acc)))
        return out, total


class TimedSink:
    """A sink as the runner sees it, plus the latency of what the backend acknowledged (log call -> ack).
    Only wrapped in when the endpoint is on; every other attribute is the sink's own."""

    def __init__(self, sink: Any, histogram: LatencyHistogram) -> None:
        self._sink = sink
        self.histogram = histogram

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)

    def open(self) -> SinkCursor | None:
        return self._sink.open()  # type: ignore[no-any-return]

    def write(self, batch: Batch) -> Ack:
        ack: Ack = self._sink.write(batch)
        now = time.time()
        events = batch.events
        n = len(events)
        if n:
            step = max(1, n // _SAMPLES)
            picked = events[::step]
            weight, extra = divmod(n, len(picked))
            for i, (_seq, ev) in enumerate(picked):
                ts = getattr(ev, "timestamp", 0.0)
                if ts > 0:
                    self.histogram.observe(max(0.0, now - ts), weight + (1 if i < extra else 0))
        return ack

    def close(self) -> None:
        self._sink.close()


class AgentCollector:
    """A prometheus-client collector: every family is read off the agent at scrape time."""

    def __init__(self, agent: Agent, latency: dict[str, LatencyHistogram], checkpoints: LatencyHistogram) -> None:
        self.agent = agent
        self.latency = latency
        self.checkpoints = checkpoints
        self.checkpoint_bytes = 0

    def describe(self) -> list[Any]:
        return []  # computed at scrape: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        a = self.agent
        yield CounterMetricFamily("flightlog_events_ingested", "Events the agent made durable in its WAL",
                                  value=a.ingestor.events_total)
        yield GaugeMetricFamily("flightlog_wal_bytes", "Bytes of the WAL's segments on disk", value=a.wal.total_bytes())
        next_seq = a.wal.next_seq
        backlog = GaugeMetricFamily("flightlog_sink_backlog_events", "WAL events behind a sink's cursor", labels=["sink"])
        backlog_b = GaugeMetricFamily("flightlog_sink_backlog_bytes", "WAL bytes behind a sink's cursor", labels=["sink"])
        state = GaugeMetricFamily("flightlog_sink_state", "1 for the sink's current state", labels=["sink", "state"])
        retries = CounterMetricFamily("flightlog_sink_retries", "Failed deliveries retried", labels=["sink"])
        delivered = CounterMetricFamily("flightlog_sink_delivered_events", "Events a backend acknowledged",
                                        labels=["sink"])
        quarantined = CounterMetricFamily("flightlog_sink_quarantined_events", "Events a backend refused for good",
                                          labels=["sink"])
        latency = HistogramMetricFamily("flightlog_delivery_latency_seconds",
                                        "From the log call to the backend's ack (sampled per batch)", labels=["sink"])
        for r in a.runners:
            st, name = r.stats, r.sink.name
            _events, nbytes = r.feed.backlog(st.cursor)
            backlog.add_metric([name], max(0, next_seq - st.cursor.seq))
            backlog_b.add_metric([name], nbytes)
            for s in dict.fromkeys((*_STATES, st.state)):
                state.add_metric([name, s], 1.0 if s == st.state else 0.0)
            retries.add_metric([name], st.retries)
            delivered.add_metric([name], st.delivered)
            quarantined.add_metric([name], st.quarantined_events)
            h = self.latency.get(name)
            if h is not None:
                buckets, total = h.snapshot()
                latency.add_metric([name], buckets, total)
        yield from (backlog, backlog_b, state, retries, delivered, quarantined, latency)
        yield from self._producers()
        yield from self._checkpoints()

    def _producers(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ing = self.agent.ingestor
        labels = ["producer", "run_id", "rank"]
        fill = GaugeMetricFamily("flightlog_ring_fill_ratio", "Share of a producer's ring not yet drained", labels=labels)
        ring_bytes = GaugeMetricFamily("flightlog_ring_backlog_bytes", "Bytes in a producer's ring not yet drained",
                                       labels=labels)
        events = CounterMetricFamily("flightlog_producer_events", "Events drained from a producer", labels=labels)
        spilled = CounterMetricFamily("flightlog_producer_spilled_events", "Events a producer wrote to its spill file"
                                      " because its ring was full", labels=labels)
        dropped = CounterMetricFamily("flightlog_producer_dropped_events", "Events a producer dropped (on_full: drop)",
                                      labels=labels)
        with ing._rings_lock:  # the ingest thread adds and removes rings
            rings = [(ring.view, ring.events) for ring in ing.rings.values()]
        for view, n in rings:
            key = [view.producer_id, view.run_id, str(view.rank)]
            pending = view.pending[1]
            fill.add_metric(key, pending / view.size if view.size else 0.0)
            ring_bytes.add_metric(key, pending)
            events.add_metric(key, n)
            spilled.add_metric(key, view.spilled)
            dropped.add_metric(key, view.dropped)
        yield from (fill, ring_bytes, events, spilled, dropped)

    def _checkpoints(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        buckets, total = self.checkpoints.snapshot()
        h = HistogramMetricFamily("flightlog_checkpoint_write_seconds", "From a checkpoint request to its file "
                                  "being durable in the agent")
        h.add_metric([], buckets, total)
        yield h
        yield CounterMetricFamily("flightlog_checkpoint_bytes", "Bytes of checkpoint files written",
                                  value=self.checkpoint_bytes)

    def checkpoint_written(self, seconds: float, nbytes: int) -> None:
        self.checkpoints.observe(seconds)
        self.checkpoint_bytes += nbytes


class MetricsServer:
    """``/metrics`` on ``agent.metrics_address``: prometheus-client's HTTP server thread, owned by a task (its
    cancellation shuts the server down)."""

    def __init__(self, agent: Agent, address: str) -> None:
        try:
            self.host, self.port = parse_address(address)
        except ValueError as exc:
            raise ConfigError(f"agent.metrics_address: {exc}") from exc
        self.latency: dict[str, LatencyHistogram] = {}
        self.collector = AgentCollector(agent, self.latency, LatencyHistogram(CHECKPOINT_BUCKETS))
        self.bound: tuple[str, int] | None = None

    def wrap(self, sink: Any) -> TimedSink:
        h = self.latency[sink.name] = LatencyHistogram(LATENCY_BUCKETS)
        return TimedSink(sink, h)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            server = make_server(self.host, self.port, make_wsgi_app(registry), _Server, handler_class=_QuietHandler)
        except OSError as exc:
            # The agent's job is the trainers' events: a taken port costs the metrics, never the agent.
            log.error("agent.metrics_address: cannot listen on %s:%d: %s; serving without /metrics (choose a "
                      "free port or remove the key)", self.host, self.port, exc)
            task_status.started()
            return
        self.bound = (self.host, server.server_address[1])
        # No poll interval: the server thread sleeps until a scrape comes (no periodic wake-up); stopping it
        # is a shutdown request plus one connection that wakes it.
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None},
                                  name="flightlog-metrics", daemon=True)
        thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", *self.bound)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._stop, server, thread)

    def _stop(self, server: Any, thread: threading.Thread) -> None:
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        while stopper.is_alive():
            try:
                socket.create_connection(self.bound or (self.host, self.port), timeout=1.0).close()
            except OSError:
                pass
            stopper.join(0.1)
        server.server_close()
        thread.join(5.0)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the agent's exit

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not worth a log line each."""
