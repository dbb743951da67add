"""The agent's Prometheus endpoint (``agent.metrics_address``): scraped during a run and parsed with
prometheus-client's own parser, its counters match what the trainer logged; off by default."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import AgentProcess
from conftest_backends import free_port
from prometheus_client.parser import text_string_to_metric_families

import flightlog
from flightlog.proto.paths import AgentPaths

pytestmark = pytest.mark.timeout(120)


def scrape(port: int) -> dict[str, list[Any]]:
    """Samples by name, e.g. ``flightlog_events_ingested_total``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    [s] = [s for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return float(s.value)


def test_scrape_during_a_run_matches_what_was_logged(agent_paths: AgentPaths, base_config: dict,
                                                     tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"agent": {"metrics_address": f"127.0.0.1:{port}"}}))
    agent = AgentProcess(agent_paths, ["--config", str(cfg)]).start()
    try:
        tracker = flightlog.ExperimentTracker("prom", base_config)
        tracker.flush()
        before = scrape(port)
        n = 300
        for step in range(n):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "acc": step / n}, step=step)
        tracker.flush()
        deadline = time.monotonic() + 30
        while True:  # the store sink delivers after its linger
            during = scrape(port)
            if value(during, "flightlog_sink_backlog_events", sink="store") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ingested = value(during, "flightlog_events_ingested_total") - value(before, "flightlog_events_ingested_total")
        assert ingested == n  # one Metrics event per log call
        delivered = (value(during, "flightlog_sink_delivered_events_total", sink="store")
                     - value(before, "flightlog_sink_delivered_events_total", sink="store"))
        assert delivered >= n  # and the monitor's system stats, if any came meanwhile
        assert value(during, "flightlog_sink_state", sink="store", state="ok") == 1.0
        assert value(during, "flightlog_sink_state", sink="store", state="retrying") == 0.0
        assert value(during, "flightlog_sink_retries_total", sink="store") == 0
        # Every delivered event with a timestamp is in the latency histogram; the log calls were just now.
        count = value(during, "flightlog_delivery_latency_seconds_count", sink="store")
        assert count - value(before, "flightlog_delivery_latency_seconds_count", sink="store") == delivered
        assert value(during, "flightlog_delivery_latency_seconds_bucket", sink="store", le="+Inf") == count
        assert value(during, "flightlog_delivery_latency_seconds_bucket", sink="store", le="60.0") == count
        # The producer's ring: drained, nothing spilled or dropped.
        ring = {"run_id": tracker.run_id, "producer": tracker.producer_id}
        assert value(during, "flightlog_ring_fill_ratio", **ring) == 0.0
        assert value(during, "flightlog_producer_events_total", **ring) >= n
        assert value(during, "flightlog_producer_spilled_events_total", **ring) == 0
        assert value(during, "flightlog_producer_dropped_events_total", **ring) == 0
        assert value(during, "flightlog_wal_bytes") > 0
        assert value(during, "flightlog_checkpoint_write_seconds_count") == 0
        assert value(during, "flightlog_checkpoint_bytes_total") == 0
        import torch

        path = tracker.save_checkpoint(torch.nn.Linear(8, 4), epoch=0, step=1)
        path.wait()
        after = scrape(port)
        assert value(after, "flightlog_checkpoint_write_seconds_count") == 1
        assert value(after, "flightlog_checkpoint_bytes_total") == Path(path).stat().st_size
        tracker.finish()
    finally:
        agent.stop()


def test_off_by_default() -> None:
    from flightlog.agent.daemon import AgentSettings

    assert AgentSettings.from_config({}).metrics_address is None
    assert AgentSettings.from_config({"agent": {"metrics_address": "127.0.0.1:9464"}}).metrics_address == \
        "127.0.0.1:9464"


REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "examples" / "flightlog-agent.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """The unit in examples/ (and in the README) passes `systemd-analyze verify` without a warning, once its
    ExecStart points at an installed `flightlog`; a typo in it would not."""
    exe = Path(sys.executable).with_name("flightlog")
    assert exe.exists(), exe
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/flightlog agent" in text
    unit = tmp_path / "flightlog-agent.service"

    def verify(body: str) -> subprocess.CompletedProcess[str]:
        unit.write_text(body.replace("/usr/local/bin/flightlog", str(exe)))
        return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)

    ok = verify(text)
    assert ok.returncode == 0 and not (ok.stdout + ok.stderr).strip(), ok.stdout + ok.stderr
    bad = verify(text.replace("Restart=on-failure", "Restrat=on-failure"))
    assert "Unknown key" in bad.stdout + bad.stderr  # the check can fail
    readme = (REPO / "README.md").read_text()
    missing = [ln for ln in text.splitlines() if ln and not ln.startswith("#") and ln not in readme]
    assert not missing, f"README's unit differs from {UNIT}: {missing}"


def test_a_taken_port_costs_the_metrics_not_the_agent(agent_paths: AgentPaths, tmp_path: Path) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"agent": {"metrics_address": f"127.0.0.1:{taken.getsockname()[1]}"}}))
    agent = AgentProcess(agent_paths, ["--config", str(cfg)]).start()  # it answers on its socket
    try:
        assert "serving without /metrics" in agent.read_log()
    finally:
        agent.stop()
        taken.close()
