"""The system monitor: one sampler per agent (per node), whatever the number of runs and ranks.

Every tick it reads the running runs from the local store (their config, decoded into the config Structs,
says what to log and how often),
finds their trainer processes among the registered producers, samples CPU, memory, disk, network and the
runs' GPUs (NVML) once, and emits one ``SystemStats`` per due run into the WAL, so every sink gets
``system/...`` metrics. It also watches free disk space and raises alerts (``flightlog status``).
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil

from flightlog.proto.config import Config, decode_config
from flightlog.proto.errors import FlightlogError
from flightlog.proto.events import Alert, Event, SystemStats
from flightlog.proto.names import node_name
from flightlog.proto.paths import AgentPaths

from .grid import next_tick, sleep_on_grid
from .store import Store

__all__ = ["producer_key", "Monitor", "RunInfo", "GpuReader", "Rates", "DiskWatch", "gpu_selection"]

log = logging.getLogger("flightlog.agent")

_DISCOVER_SECONDS = 1.0  # how soon a new run gets its first sample (one small SQLite query)
_MIN_SLEEP = 0.05
_WATCH_SECONDS = 5.0  # the disk watch and the store's list of running runs, when nothing else is due sooner


# --- sans-IO parts ---------------------------------------------------------------------------------------


class Rates:
    """Per-second rates of monotonically growing counters (bytes read, sent...) between two samples."""

    def __init__(self) -> None:
        self._prev: dict[str, tuple[float, float]] = {}

    def update(self, now: float, counters: Mapping[str, float]) -> dict[str, float]:
        out = {}
        for key, value in counters.items():
            prev = self._prev.get(key)
            self._prev[key] = (now, value)
            if prev is not None and now > prev[0] and value >= prev[1]:  # a reset counter gives no rate
                out[key] = (value - prev[1]) / (now - prev[0])
        return out

    def forget(self, prefix: str, keep: Mapping[str, float]) -> None:
        """Drop the counters under ``prefix`` that are not in ``keep`` (processes that exited)."""
        for key in [k for k in self._prev if k.startswith(prefix) and k not in keep]:
            del self._prev[key]


@dataclass
class DiskWatch:
    """Free space against a floor, with hysteresis (5 %) so a disk hovering at the floor does not flap."""

    alerts: dict[str, str] = field(default_factory=dict)

    def check(self, key: str, path: str, free: int, floor: int) -> tuple[str, str] | None:
        """("raised" | "cleared", message) when the state of ``key`` changes, else None."""
        if floor <= 0:
            return None
        if free < floor and key not in self.alerts:
            msg = (f"low disk space: {free / 2**30:.2f} GiB free on {path} ({key}), below the floor of "
                   f"{floor / 2**30:.2f} GiB (monitoring.disk_free_floor_bytes); free space or the WAL and "
                   "checkpoints will fail")
            self.alerts[key] = msg
            return "raised", msg
        if free >= floor * 1.05 and key in self.alerts:
            del self.alerts[key]
            return "cleared", f"disk space on {path} ({key}) is back above the floor: {free / 2**30:.2f} GiB free"
        return None


def producer_key(producers: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """What changes when a producer comes, closes or goes (the monitor's and the plots' cue to look)."""
    return sorted((str(p.get("producer")), bool(p.get("closed"))) for p in producers)


def _children_by_parent() -> dict[int, list[int]]:
    """parent pid -> child pids, from one pass over the process table (psutil's own map where it has
    one: what ``Process.children`` reads, without a Process object per pid)."""
    out: dict[int, list[int]] = {}
    ppid_map = getattr(psutil, "_ppid_map", None)
    try:
        pairs = ppid_map().items() if ppid_map else ((p.pid, p.info.get("ppid")) for p in psutil.process_iter(["ppid"]))
        for pid, ppid in pairs:
            if ppid:
                out.setdefault(ppid, []).append(pid)
    except psutil.Error:
        pass
    return out


def _kernel_lists_children() -> bool:
    """Whether /proc/<pid>/task/<tid>/children exists (Linux with CONFIG_PROC_CHILDREN, the usual build)."""
    return os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children")


_KERNEL_CHILDREN = _kernel_lists_children()


def _kernel_children(pid: int) -> list[int]:
    """``pid``'s children as the kernel lists them per thread: a few small reads per trainer, where the
    process table is a read per process on the node (a millisecond per hundred)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out  # it exited
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    return out


def _descendants(pid: int, kids: Mapping[int, list[int]] | None) -> list[int]:
    """Every process below ``pid``: from ``kids`` (parent -> children), or, with None, from the kernel."""
    def children(p: int) -> list[int]:
        return _kernel_children(p) if kids is None else list(kids.get(p, ()))

    out, todo, seen = [], children(pid), {pid}
    while todo:
        child = todo.pop()
        if child in seen:
            continue  # a pid reused while we walked
        seen.add(child)
        out.append(child)
        todo.extend(children(child))
    return out


def gpu_selection(cuda_visible: str | None, all_gpus: bool) -> list[tuple[str, str]] | None:
    """[(label, device ref)] for a run, or None for every GPU (labelled by NVML index).

    ``CUDA_VISIBLE_DEVICES="2,3"`` → [("0", "2"), ("1", "3")]: labels are the job's cuda ordinals; refs are
    NVML indexes or ``GPU-…`` UUIDs. An empty value means the job sees no GPU. (CUDA numbers GPUs fastest
    first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; on the usual node of identical GPUs both orders are NVML's.)
    """
    if all_gpus or cuda_visible is None:
        return None
    out = []
    for i, ref in enumerate(p.strip() for p in cuda_visible.split(",")):
        if not ref:
            continue
        if not (ref.isdigit() or ref.startswith("GPU-")):
            break  # CUDA stops at the first invalid entry; MIG devices are not sampled here
        out.append((str(i), ref))
    return out


# --- NVML ------------------------------------------------------------------------------------------------


class GpuReader:
    """Per-GPU stats through NVML (``nvidia-ml-py``); absent library, driver or GPU → one info line, {}."""

    def __init__(self, module_name: str = "pynvml") -> None:
        self.module_name = module_name
        self.nvml: Any = None
        self.available: bool | None = None  # None: not tried yet
        self.reason = ""
        self._handles: dict[str, Any] = {}
        self._unsupported: set[tuple[str, str]] = set()

    def start(self) -> bool:
        if self.available is not None:
            return self.available
        try:
            nvml = importlib.import_module(self.module_name)
            nvml.nvmlInit()
            self.count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.available = False
            self.reason = f"{type(exc).__name__}: {exc}"
            log.info("GPU monitoring off: NVML is not available (%s); CPU, memory, disk and network stats "
                     "go on", self.reason)
            return False
        self.nvml = nvml
        self.available = True
        log.info("GPU monitoring: NVML sees %d GPU(s)", self.count)
        return True

    def _handle(self, ref: str) -> Any:
        h = self._handles.get(ref)
        if h is None:
            nvml = self.nvml
            if ref.startswith("GPU-"):
                h = nvml.nvmlDeviceGetHandleByUUID(ref.encode() if isinstance(ref, str) else ref)
            else:
                h = nvml.nvmlDeviceGetHandleByIndex(int(ref))
            self._handles[ref] = h
        return h

    def read(self, refs: Iterable[str]) -> dict[str, dict[str, float]]:
        """ref → {metric: value}; a device or a field that fails is left out (and not asked again)."""
        if not self.start():
            return {}
        out = {}
        for ref in refs:
            try:
                h = self._handle(ref)
            except Exception as exc:
                if ("dev", ref) not in self._unsupported:
                    self._unsupported.add(("dev", ref))
                    log.warning("GPU %s: NVML cannot open it (%s); it is not monitored", ref, exc)
                continue
            out[ref] = self._fields(ref, h)
        return out

    def all_refs(self) -> list[str]:
        return [str(i) for i in range(self.count)] if self.start() else []

    def _fields(self, ref: str, h: Any) -> dict[str, float]:
        nvml = self.nvml
        vals: dict[str, float] = {}

        def get(name: str, fn: Callable[[], Any]) -> Any:
            if (ref, name) in self._unsupported:
                return None
            try:
                return fn()
            except Exception:  # NVMLError_NotSupported on some boards (power, clocks); ask once
                self._unsupported.add((ref, name))
                return None

        util = get("util", lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            vals["utilization_percent"] = float(util.gpu)
            vals["memory_utilization_percent"] = float(util.memory)
        mem = get("mem", lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            vals["memory_used_bytes"] = float(mem.used)
            vals["memory_total_bytes"] = float(mem.total)
            if mem.total:
                vals["memory_percent"] = 100.0 * mem.used / mem.total
        temp = get("temp", lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        if temp is not None:
            vals["temperature_c"] = float(temp)
        power = get("power", lambda: nvml.nvmlDeviceGetPowerUsage(h))
        if power is not None:
            vals["power_watts"] = power / 1000.0
        clock = get("clock", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
        if clock is not None:
            vals["sm_clock_mhz"] = float(clock)
        return vals

    def close(self) -> None:
        if self.available and self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
        self.available = None
        self._handles.clear()


# --- runs ------------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    run_id: str
    config: Config  # the run's own config, decoded (every default comes from the Structs)
    metadata: dict[str, Any]
    pids: dict[int, int] = field(default_factory=dict)  # pid -> rank
    next_due: float = 0.0
    created_at: float = 0.0
    last_step: int = -1
    distributed: bool = False  # a rank of a job: its system metrics are this node's, system/<node>/...

    def next_step(self, wall: float) -> int:
        """Seconds since the run started: comparable across runs, and still increasing after an agent
        restart (a new monitor does not start again at 0); bumped by one if two samples share a second."""
        self.last_step = max(int(wall - self.created_at) if self.created_at else 0, self.last_step + 1)
        return self.last_step

    @property
    def interval(self) -> float:
        return self.config.monitoring.interval_seconds  # > 0: the Struct says so

    def dirs(self, data_dir: Path) -> dict[str, str]:
        """The directories whose disks this run's stats report. The SDK sends absolute paths; a relative one
        (a hand-made RunStart, a default the SDK did not resolve) means nothing in the agent's cwd."""
        out = {"data": str(data_dir)}
        t, c = self.config.tracking, self.config.checkpointing
        if Path(c.checkpoint_dir).is_absolute():
            out["checkpoint"] = c.checkpoint_dir
        if t.use_tensorboard and Path(t.tensorboard_log_dir).is_absolute():
            out["tensorboard"] = t.tensorboard_log_dir
        if t.use_wandb and t.wandb_dir and Path(t.wandb_dir).is_absolute():
            out["wandb"] = t.wandb_dir
        return out

    def cuda_visible(self) -> str | None:
        env = (self.metadata.get("environment") or {}).get("env")
        if not isinstance(env, dict):
            return None  # an SDK without capture: all GPUs
        value = env.get("CUDA_VISIBLE_DEVICES")
        return None if value is None else str(value)


def _existing(path: str) -> str:
    """The path itself or its nearest existing parent (a checkpoint dir not created yet)."""
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    return str(p)


class Monitor:
    """The agent's system sampler. ``run`` is one task in the agent's task group."""

    def __init__(self, paths: AgentPaths, producers: Callable[[], list[dict[str, Any]]],
                 emit: Callable[[Event], object], settings: Config | Mapping[str, Any] | None = None, *,
                 gpu: GpuReader | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        self._producers = producers
        self.emit = emit
        if not isinstance(settings, Config):
            settings, problems = decode_config(settings)
            for problem in problems:  # the agent said these when it read its settings (AgentSettings)
                log.debug("monitor: agent settings: %s", problem)
        self.agent_floor = settings.monitoring.disk_free_floor_bytes
        self.gpu = gpu or GpuReader()
        self.clock = clock
        self.host = socket.gethostname()
        self.node = node_name()
        self.disk = DiskWatch()
        self.runs: dict[str, RunInfo] = {}
        self.samples_total = 0
        self._rates = Rates()
        self._procs: dict[int, psutil.Process] = {}
        self._proc_cpu = Rates()
        self._store: Store | None = None  # read-only, long-lived; used by one tick (worker thread) at a time
        self._system(self.clock())  # prime CPU and I/O counters: the first real sample has rates

    # --- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            seen: Any = None
            wake_at = 0.0
            while True:
                producers = self._producer_list()
                # A pass (a thread hop and a store query) when one is due or the producers changed; the
                # look at the producers in between is a cheap one on the event loop, once a second.
                key = producer_key(producers)
                if key != seen or self.clock() >= wake_at:
                    seen = key
                    try:
                        delay = await anyio.to_thread.run_sync(self.tick, producers)
                    except Exception:  # disk full (the WAL refuses the stats), or a bug: never the agent's end
                        log.exception("monitor: sampling failed; trying again in %.0f s", _DISCOVER_SECONDS)
                        delay = _DISCOVER_SECONDS
                    wake_at = self.clock() + delay
                # On the agent's one-second grid, or at the next sample if sooner (runs' samples fall on
                # the grid too: _new_run aligns the first).
                await sleep_on_grid(_DISCOVER_SECONDS,
                                    anyio.current_time() + max(_MIN_SLEEP, wake_at - self.clock()))
        finally:
            with anyio.CancelScope(shield=True):  # noqa: ASYNC100 - close() must finish even when cancelled
                self.close()

    def _producer_list(self) -> list[dict[str, Any]]:
        for _ in range(3):  # the ingest thread may add or retire a ring meanwhile
            try:
                return self._producers()
            except RuntimeError:
                continue
        return []

    def producer_key(self) -> list[tuple[str, bool]]:
        return producer_key(self._producer_list())

    def alerts(self) -> list[str]:
        return list(self.disk.alerts.values())

    def close(self) -> None:
        self._close_store()
        self.gpu.close()

    def tick(self, producers: list[dict[str, Any]]) -> float:
        """One pass (in a worker thread): refresh runs, watch disks, sample and emit for due runs.
        Returns the seconds until the next pass."""
        try:
            self._refresh_runs(producers)
        except (sqlite3.Error, FlightlogError) as exc:
            log.debug("monitor: cannot read the runs table yet: %s", exc)
            self._close_store()  # opened again next tick (the store sink may not have created it yet)
        wall = time.time()
        self._watch_disks(wall)
        # A live producer whose run the store does not list yet (its RunStart is on its way): look again
        # soon; otherwise at the next sample (or the disk watch's period).
        waiting = any(not p.get("closed") and not any(str(p.get("producer") or "").startswith(rid + "-")
                                                      for rid in self.runs) for p in producers)
        again = _DISCOVER_SECONDS if waiting else _WATCH_SECONDS
        if not self.runs:
            return again
        now = self.clock()
        due = [r for r in self.runs.values() if r.next_due <= now]
        if due:
            self._sample_and_emit(due, wall, now)
        nxt = min(r.next_due for r in self.runs.values())
        return min(max(_MIN_SLEEP, nxt - self.clock()), again)

    # --- runs --------------------------------------------------------------------------------------

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _open_store(self) -> Store | None:
        if self._store is None and self.paths.store.exists():
            self._store = Store(self.paths.store, readonly=True)
        return self._store

    def _new_run(self, store: Store, run_id: str, created_at: float) -> RunInfo:
        config, problems = decode_config(store.run_config(run_id))
        for problem in problems:
            log.info("monitor: run %s: config %s", run_id, problem)
        info = RunInfo(run_id, config, store.run_metadata(run_id), created_at=created_at,
                       distributed=bool(store.rank_table(run_id)))
        # The first sample comes one interval after discovery, so that it has rates and CPU shares.
        info.next_due = next_tick(self.clock(), info.interval)  # with the agent's other periodic wake-ups
        return info

    def _refresh_runs(self, producers: list[dict[str, Any]]) -> None:
        live: dict[str, dict[int, int]] = {}
        for p in producers:
            if p.get("closed"):
                continue
            pid = int(p.get("pid") or 0)
            producer = str(p.get("producer") or "")
            live.setdefault(producer, {})[pid] = int(p.get("rank") or 0)
        store = self._open_store()
        if store is None:
            return
        seen = set()
        for run_id, _status, created_at, _ended, pid, rank, host in store.run_states("running"):
            pids: dict[int, int] = {}
            for producer, ps in live.items():
                if producer.startswith(run_id + "-"):  # producer ids are "<run id>-<pid>-<random>"
                    pids.update(ps)
            if not pids and pid and host == self.host:
                pids = {int(pid): int(rank or 0)}
            pids = {p: r for p, r in pids.items() if psutil.pid_exists(p)}
            if not pids:
                continue  # its trainer is gone (killed without a RunEnd): nothing to watch
            seen.add(run_id)
            info = self.runs.get(run_id)
            if info is None:
                info = self.runs[run_id] = self._new_run(store, run_id, created_at)
            new_pids = [p for p in pids if p not in info.pids]
            info.pids = pids
            for new_pid in new_pids:
                self._process(new_pid, self.clock(), {})  # prime its CPU counter
        for run_id in list(self.runs):
            if run_id not in seen:
                del self.runs[run_id]

    # --- disks -------------------------------------------------------------------------------------

    def _watch_disks(self, wall: float) -> None:
        checks = {("data", str(self.paths.data_dir)): self.agent_floor}
        for r in self.runs.values():
            floor = r.config.monitoring.disk_free_floor_bytes
            dirs = r.dirs(self.paths.data_dir)
            for label in ("data", "checkpoint"):
                if label in dirs:
                    key = (label, dirs[label])
                    checks[key] = max(checks.get(key, 0), floor)
        for (label, path), floor in checks.items():
            try:
                free = psutil.disk_usage(_existing(path)).free
            except OSError:
                continue
            change = self.disk.check(f"{label} directory {path}", path, free, floor)
            if change is None:
                continue
            state, msg = change
            if state == "raised":
                log.warning("%s", msg)
            else:
                log.info("%s", msg)
            for r in self.runs.values():
                self.emit(Alert(r.run_id, "warning" if state == "raised" else "info", msg, wall,
                                key=f"disk/{label}"))

    # --- sampling ----------------------------------------------------------------------------------

    def _system(self, now: float) -> tuple[dict[str, float], dict[str, float]]:
        """(cpu and network values, memory values), sampled once for every run."""
        vals: dict[str, float] = {"system/cpu_percent": psutil.cpu_percent(None)}
        counters: dict[str, float] = {}
        io = psutil.disk_io_counters()
        if io is not None:
            counters["system/disk/read_bytes_per_second"] = io.read_bytes
            counters["system/disk/write_bytes_per_second"] = io.write_bytes
        net = psutil.net_io_counters()
        if net is not None:
            counters["system/network/sent_bytes_per_second"] = net.bytes_sent
            counters["system/network/recv_bytes_per_second"] = net.bytes_recv
        vals.update(self._rates.update(now, counters))
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        mem = {
            "system/memory/used_bytes": float(vm.total - vm.available),
            "system/memory/available_bytes": float(vm.available),
            "system/memory/percent": float(vm.percent),
            "system/swap/used_bytes": float(sw.used),
            "system/swap/percent": float(sw.percent),
        }
        return vals, mem

    def _process(self, pid: int, now: float, kids: Mapping[int, list[int]] | None
                 ) -> tuple[float | None, float | None, dict[str, float]]:
        """(cpu percent of one core since the last sample, RSS bytes) of one trainer process, and the
        same summed over its descendants (dataloader workers and other helpers) with their count
        (``kids``: parent -> children, or None to ask the kernel)."""
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                t = proc.cpu_times()
                rss = float(proc.memory_info().rss)
        except psutil.Error:
            self._procs.pop(pid, None)
            return None, None, {}
        counters = {str(pid): t.user + t.system}
        children = _descendants(pid, kids)
        workers: dict[str, float] = {"workers": float(len(children)), "workers_rss_bytes": 0.0}
        for child_pid in children:
            try:
                child = psutil.Process(child_pid)
                with child.oneshot():
                    ct = child.cpu_times()
                    workers["workers_rss_bytes"] += float(child.memory_info().rss)
            except psutil.Error:
                continue  # it just exited
            counters[f"{pid}/{child_pid}"] = ct.user + ct.system
        rates = self._proc_cpu.update(now, counters)
        cpu = rates.pop(str(pid), None)
        if rates:  # a worker seen for the first time has no rate yet; those that exited drop out
            workers["workers_cpu_percent"] = 100.0 * sum(rates.values())
        self._proc_cpu.forget(f"{pid}/", counters)
        return (None if cpu is None else 100.0 * cpu), rss, workers

    def _sample_and_emit(self, due: list[RunInfo], wall: float, now: float) -> None:
        base, mem = self._system(now)
        kids = None if _KERNEL_CHILDREN else _children_by_parent()  # None: each trainer's, from the kernel
        procs = {pid: self._process(pid, now, kids) for pid in {p for r in due for p in r.pids}}  # each pid once
        for pid in [p for p in self._procs if p not in procs and not any(p in r.pids for r in self.runs.values())]:
            del self._procs[pid]  # forget processes of runs that ended
        disks: dict[str, dict[str, float]] = {}
        gpu_refs: set[str] = set()
        selections: dict[str, list[tuple[str, str]]] = {}
        for r in due:
            for path in r.dirs(self.paths.data_dir).values():
                if path not in disks:
                    try:
                        u = psutil.disk_usage(_existing(path))
                        disks[path] = {"free_bytes": float(u.free), "used_percent": float(u.percent)}
                    except OSError:
                        disks[path] = {}
            if r.config.monitoring.log_gpu_usage:
                sel = gpu_selection(r.cuda_visible(), r.config.monitoring.all_gpus)
                if sel is None:
                    sel = [(ref, ref) for ref in self.gpu.all_refs()]
                selections[r.run_id] = sel
                gpu_refs.update(ref for _, ref in sel)
        gpus = self.gpu.read(sorted(gpu_refs)) if gpu_refs else {}
        for r in due:
            values = dict(base)
            log_mem = r.config.monitoring.log_memory_usage
            if log_mem:
                values.update(mem)
            for pid, rank in r.pids.items():
                cpu, rss, workers = procs.get(pid, (None, None, {}))
                name = f"system/process/rank{rank}" if list(r.pids.values()).count(rank) == 1 else \
                    f"system/process/pid{pid}"
                if cpu is not None:
                    values[f"{name}/cpu_percent"] = cpu
                if rss is not None and log_mem:
                    values[f"{name}/rss_bytes"] = rss
                for k, v in workers.items():
                    if log_mem or not k.endswith("rss_bytes"):
                        values[f"{name}/{k}"] = v
            for label, path in r.dirs(self.paths.data_dir).items():
                for k, v in disks.get(path, {}).items():
                    values[f"system/disk/{label}/{k}"] = v
            for label, ref in selections.get(r.run_id, []):
                for k, v in gpus.get(ref, {}).items():
                    values[f"system/gpu/{label}/{k}"] = v
            if r.distributed:  # every node's agent samples the job's run: one key space per node
                values = {f"system/{self.node}/{k[len('system/'):]}": v for k, v in values.items()}
            self.emit(SystemStats(r.run_id, wall, values, r.next_step(wall)))
            r.next_due = max(r.next_due + r.interval, now)
            self.samples_total += 1

