"""The system monitor: its sans-IO parts, NVML through fake modules (absent, failing, four GPUs), the disk
floor alert, and a real agent process whose NVML is broken still logging system/cpu and system/memory."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess

import flightlog
from flightlog.agent.monitor import DiskWatch, GpuReader, Monitor, Rates, gpu_selection
from flightlog.agent.store import Store
from flightlog.proto.events import Alert, RunStart, SystemStats
from flightlog.proto.paths import AgentPaths

# --- sans-IO parts ----------------------------------------------------------------------------------------


def test_rates() -> None:
    r = Rates()
    assert r.update(10.0, {"a": 100, "b": 5}) == {}
    assert r.update(12.0, {"a": 300, "b": 5}) == {"a": 100.0, "b": 0.0}
    assert r.update(13.0, {"a": 0}) == {}  # a counter that went back (reset) gives no rate
    assert r.update(14.0, {"a": 50}) == {"a": 50.0}


def test_the_kernels_child_lists_and_the_process_table_find_the_same_descendants() -> None:
    """A trainer's workers (and theirs) come from /proc/<pid>/task/*/children, a few reads per trainer;
    the process table (a read per process on the node) is the fallback, and both give the same tree."""
    from flightlog.agent import monitor

    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print(c.pid, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = 0
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        table = monitor._descendants(os.getpid(), monitor._children_by_parent())
        assert {child.pid, grandchild} <= set(table)
        if not monitor._KERNEL_CHILDREN:
            pytest.skip("this kernel does not list children in /proc (CONFIG_PROC_CHILDREN)")
        assert sorted(monitor._descendants(os.getpid(), None)) == sorted(table)
        assert monitor._descendants(child.pid, None) == [grandchild]
    finally:
        if grandchild:
            os.kill(grandchild, 9)
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
    assert monitor._kernel_children(child.pid) == []  # gone: nothing, no error


def test_disk_watch_hysteresis() -> None:
    w = DiskWatch()
    assert w.check("k", "/d", free=500, floor=1000)[0] == "raised"  # type: ignore[index]
    assert w.check("k", "/d", free=400, floor=1000) is None  # once
    assert w.check("k", "/d", free=1010, floor=1000) is None  # within 5 %: still low
    assert w.check("k", "/d", free=2000, floor=1000)[0] == "cleared"  # type: ignore[index]
    assert w.alerts == {}
    assert w.check("k", "/d", free=0, floor=0) is None  # floor 0: off


def test_gpu_selection() -> None:
    assert gpu_selection(None, False) is None
    assert gpu_selection("2,3", True) is None
    assert gpu_selection("2,3", False) == [("0", "2"), ("1", "3")]
    assert gpu_selection("", False) == []
    assert gpu_selection("GPU-abc, 1", False) == [("0", "GPU-abc"), ("1", "1")]
    assert gpu_selection("1,bogus,2", False) == [("0", "1")]  # CUDA stops at the first bad entry


# --- fake NVML modules ------------------------------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801 - the name pynvml uses
    pass


def broken_nvml() -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError  # type: ignore[attr-defined]

    def nvmlInit() -> None:  # noqa: N802
        raise NVMLError_DriverNotLoaded("Driver Not Loaded")

    mod.nvmlInit = nvmlInit  # type: ignore[attr-defined]
    return mod


def four_gpu_nvml(calls: list[str]) -> types.ModuleType:
    """Four GPUs; GPU 3 has no power reading (NotSupported), as some boards do."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    mod.NVML_CLOCK_SM = 1  # type: ignore[attr-defined]
    ns = types.SimpleNamespace
    mod.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: 4  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: ns(i=i)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUtilizationRates = lambda h: ns(gpu=10 * h.i, memory=5)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: ns(used=h.i << 30, total=80 << 30)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetTemperature = lambda h, kind: 40 + h.i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetClockInfo = lambda h, kind: 1000 + h.i  # type: ignore[attr-defined]

    def power(h: Any) -> int:
        calls.append(f"power{h.i}")
        if h.i == 3:
            raise NVMLError("Not Supported")
        return 250_000 + h.i

    mod.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    return mod


def test_nvml_absent_or_broken_says_so_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flightlog.agent")
    monkeypatch.setitem(sys.modules, "pynvml", broken_nvml())
    g = GpuReader()
    assert g.read(["0"]) == {} and g.read(["0"]) == {} and g.all_refs() == []
    lines = [r for r in caplog.records if "NVML is not available" in r.getMessage()]
    assert len(lines) == 1 and "DriverNotLoaded" in lines[0].getMessage()

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed at all: import fails
    g2 = GpuReader()
    assert g2.read(["0"]) == {} and g2.available is False


# --- the monitor in-process, over a real store --------------------------------------------------------------


def make_paths(tmp_path: Path) -> AgentPaths:
    data = tmp_path / "data"
    data.mkdir()
    return AgentPaths(data_dir=data, socket=tmp_path / "a.sock", ring_dir=tmp_path / "rings",
                      spill_dir=data / "spill")


def add_run(paths: AgentPaths, run_id: str, monitoring: dict[str, Any], env: dict[str, str] | None = None,
            pid: int | None = None) -> None:
    store = Store(paths.store)
    cfg = {"monitoring": monitoring, "checkpointing": {"checkpoint_dir": str(paths.data_dir / "ckpt")},
           "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(paths.data_dir / "tb")}}
    store.apply([RunStart(run_id, "r", time.time(), config=cfg, pid=pid or os.getpid(), host=socket.gethostname(),
                          metadata={"environment": {"env": env or {}}})])
    store.close()


def test_monitor_samples_runs_with_their_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", four_gpu_nvml(calls))
    paths = make_paths(tmp_path)
    add_run(paths, "job-a", {"interval_seconds": 0.01}, {"CUDA_VISIBLE_DEVICES": "2,3"})
    add_run(paths, "job-b", {"interval_seconds": 0.01, "log_gpu_usage": False, "log_memory_usage": False})
    add_run(paths, "job-c", {"interval_seconds": 0.01, "all_gpus": True}, {"CUDA_VISIBLE_DEVICES": "1"})
    # job-d's trainer is gone (no live pid): not sampled
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    add_run(paths, "job-d", {"interval_seconds": 0.01}, pid=dead.pid)
    events: list[Any] = []
    producers = [{"producer": "job-a-1-x", "pid": os.getpid(), "rank": 3, "closed": False}]
    mon = Monitor(paths, lambda: producers, events.append, {"monitoring": {"disk_free_floor_bytes": 0}})
    for _ in range(4):  # the first pass discovers the runs, the next ones sample them
        mon.tick(producers)
        time.sleep(0.02)
    mon.close()
    stats = [e for e in events if isinstance(e, SystemStats)]
    by_run = {r: [e for e in stats if e.run_id == r] for r in ("job-a", "job-b", "job-c", "job-d")}
    assert by_run["job-d"] == []
    steps = [e.step for e in by_run["job-a"]]
    assert len(steps) >= 2 and steps == sorted(set(steps))  # seconds since the run started, increasing
    a = by_run["job-a"][-1].values
    assert a["system/gpu/0/utilization_percent"] == 20.0  # cuda:0 of job-a is NVML GPU 2
    assert a["system/gpu/1/memory_used_bytes"] == float(3 << 30)
    assert a["system/gpu/0/power_watts"] == 250.002 and "system/gpu/1/power_watts" not in a
    assert a["system/gpu/1/temperature_c"] == 43.0 and a["system/gpu/0/sm_clock_mhz"] == 1002.0
    assert not any(k.startswith("system/gpu/2/") for k in a)
    assert "system/process/rank3/cpu_percent" in a and a["system/process/rank3/rss_bytes"] > 0
    for key in ("system/cpu_percent", "system/memory/used_bytes", "system/swap/percent",
                "system/disk/data/free_bytes", "system/disk/checkpoint/used_percent",
                "system/disk/tensorboard/free_bytes"):
        assert key in a, key
    b = by_run["job-b"][-1].values
    assert "system/cpu_percent" in b and not any("gpu" in k or "memory" in k or "rss" in k for k in b)
    c = by_run["job-c"][-1].values
    assert {k.split("/")[2] for k in c if k.startswith("system/gpu/")} == {"0", "1", "2", "3"}
    assert calls.count("init") == 1 and calls.count("power3") == 1  # unsupported: asked once
    assert calls[-1] == "shutdown"


def test_monitor_counts_the_trainers_workers(tmp_path: Path) -> None:
    """Dataloader-style worker processes (descendants of the trainer) are summed under workers_*."""
    paths = make_paths(tmp_path)
    trainer = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(2)]\n"
        "time.sleep(60)\n")])
    try:
        add_run(paths, "job-w", {"interval_seconds": 0.2}, pid=trainer.pid)
        events: list[Any] = []
        mon = Monitor(paths, list, events.append, {"monitoring": {"disk_free_floor_bytes": 0}})
        deadline = time.monotonic() + 30
        values: dict[str, float] = {}
        while time.monotonic() < deadline and "system/process/rank0/workers_cpu_percent" not in values:
            mon.tick([])
            stats = [e for e in events if isinstance(e, SystemStats) and e.run_id == "job-w"]
            values = stats[-1].values if stats else {}
            time.sleep(0.2)
        mon.close()
        assert values["system/process/rank0/workers"] == 2
        assert values["system/process/rank0/workers_cpu_percent"] > 20  # two busy loops (on two cores)
        assert values["system/process/rank0/workers_rss_bytes"] > 0
        assert values["system/process/rank0/cpu_percent"] < values["system/process/rank0/workers_cpu_percent"]
    finally:
        for child in __import__("psutil").Process(trainer.pid).children(recursive=True):
            child.kill()
        trainer.kill()
        trainer.wait()


def test_monitor_disk_floor_alert(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flightlog.agent")
    paths = make_paths(tmp_path)
    add_run(paths, "job", {"interval_seconds": 60, "disk_free_floor_bytes": 1 << 62, "log_gpu_usage": False})
    events: list[Any] = []
    mon = Monitor(paths, list, events.append, {"monitoring": {"disk_free_floor_bytes": 0}})
    mon.tick([])
    mon.tick([])
    alerts = [e for e in events if isinstance(e, Alert)]
    assert {a.key for a in alerts} == {"disk/data", "disk/checkpoint"} and len(alerts) == 2
    assert all(a.level == "warning" and a.run_id == "job" for a in alerts)
    assert len(mon.alerts()) == 2 and "low disk space" in mon.alerts()[0]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


# --- a real agent ---------------------------------------------------------------------------------------------


def test_agent_monitor_without_nvml_logs_system_metrics_and_alerts(
        agent_paths: AgentPaths, base_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(
        "class NVMLError(Exception):\n    pass\n"
        "class NVMLError_DriverNotLoaded(NVMLError):\n    pass\n"
        "def nvmlInit():\n    raise NVMLError_DriverNotLoaded('Driver Not Loaded')\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    settings = json.dumps({"monitoring": {"disk_free_floor_bytes": 1 << 62}})
    proc = AgentProcess(agent_paths, ["--settings-json", settings]).start()
    try:
        cfg = {**base_config, "monitoring": {"interval_seconds": 0.3}}
        with flightlog.ExperimentTracker("mon", cfg) as t:
            db = Store(agent_paths.store, readonly=True)
            deadline = time.monotonic() + 30
            count = 0
            while time.monotonic() < deadline:
                count = db.metric_count(t.run_id, "system/cpu_percent")
                if count >= 3:
                    break
                time.sleep(0.1)
            assert count >= 3, proc.read_log()
            keys = set(db.metric_keys(t.run_id))
            db.close()
            status = subprocess.run(
                [sys.executable, "-m", "flightlog.agent.cli", "status", "--data-dir", str(agent_paths.data_dir),
                 "--socket", str(agent_paths.socket)], capture_output=True, text=True, timeout=30)
        assert {"system/memory/used_bytes", "system/memory/percent", "system/process/rank0/cpu_percent",
                "system/process/rank0/rss_bytes", "system/disk/data/free_bytes"} <= keys
        assert not any(k.startswith("system/gpu/") for k in keys)
        assert "ALERT: low disk space" in status.stdout, status.stdout + status.stderr
    finally:
        proc.stop()
    log = proc.read_log()
    assert log.count("NVML is not available") == 1, log
    assert "NVMLError_DriverNotLoaded: Driver Not Loaded" in log
