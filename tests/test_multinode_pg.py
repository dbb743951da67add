"""Issue 11, item 5 (and item 2's last sentence): a job over many nodes, one agent per node, is one MLflow run
on a tracking server backed by PostgreSQL, every point exactly once, even when one node's agent is SIGKILLed
and restarted mid-run; each node's system metrics are its own (``system/<node>/...``). Two agents with their
own data dirs and sockets, and FLIGHTLOG_NODE naming them, stand for two nodes."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_monitor import make_paths

from flightlog.agent.monitor import Monitor
from flightlog.agent.store import Store
from flightlog.proto.events import RunStart, SystemStats
from flightlog.proto.names import node_name


def _sample(paths: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, float]]:
    events: list[Any] = []
    mon = Monitor(paths, list, events.append, {"monitoring": {"disk_free_floor_bytes": 0}})
    for _ in range(3):  # the first pass discovers the runs, the next ones sample them
        mon.tick([])
        time.sleep(0.02)
    mon.close()
    return {e.run_id: e.values for e in events if isinstance(e, SystemStats)}


def test_system_metrics_of_a_distributed_run_are_per_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIGHTLOG_NODE", "node b/7")
    paths = make_paths(tmp_path)
    cfg = {"monitoring": {"interval_seconds": 0.01, "log_gpu_usage": False}}
    with Store(paths.store) as store:
        with store.transaction():
            store.apply([RunStart("job", "j", time.time(), config=cfg, pid=os.getpid(), rank=2, world_size=4,
                                  host=os.uname().nodename),
                         RunStart("solo", "s", time.time(), config=cfg, pid=os.getpid(), host=os.uname().nodename)])
    values = _sample(paths, monkeypatch)
    assert node_name() == "node_b_7"  # one key component, whatever the variable holds
    job, solo = values["job"], values["solo"]
    assert "system/node_b_7/cpu_percent" in job and "system/node_b_7/memory/used_bytes" in job
    assert all(k.startswith("system/node_b_7/") for k in job)
    assert "system/cpu_percent" in solo and not any("node_b_7" in k for k in solo)  # one process: one node
    monkeypatch.delenv("FLIGHTLOG_NODE")
    assert node_name() == node_name({"FLIGHTLOG_NODE": os.uname().nodename})  # the host name by default
