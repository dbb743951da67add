"""The storage layer: the one transaction helper (proto/sqlite.py) under real SQLite failures, the Store's
long-lived connections shared by threads, and what the monitor and the plot service read through it."""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flightlog.agent.daemon import AgentSettings
from flightlog.agent.plots import PlotService, render_plots
from flightlog.agent.store import RunState, Store
from flightlog.proto import sqlite as fsqlite
from flightlog.proto.checkpoint.registry import Registry
from flightlog.proto.config import Config, config_to_dict, decode_config
from flightlog.proto.events import Metrics, RunEnd, RunStart, SystemStats
from flightlog.proto.paths import AgentPaths


class FlakyConnection(fsqlite.Connection):
    """A real connection whose next ROLLBACK fails, as it can on a full disk or an I/O error."""

    fail_rollbacks = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "ROLLBACK" and self.fail_rollbacks:
            self.fail_rollbacks -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


def flaky(path: Path) -> FlakyConnection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=FlakyConnection)
    db.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    return db


def count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM t").fetchone()[0])


# --- the transaction helper ----------------------------------------------------------------------------------


def test_an_error_in_the_body_rolls_back_and_is_raised(tmp_path: Path) -> None:
    db = flaky(tmp_path / "db")
    with pytest.raises(ValueError, match="boom"), fsqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (1)")
        raise ValueError("boom")
    assert count(db) == 0 and not db.in_transaction


def test_a_failing_rollback_does_not_mask_the_original_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = flaky(tmp_path / "db")
    db.fail_rollbacks = 1
    with pytest.raises(ValueError, match="boom") as info, fsqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (1)")
        raise ValueError("boom")
    assert any("ROLLBACK that followed failed too" in note for note in info.value.__notes__)
    assert "ROLLBACK failed after ValueError" in caplog.text
    assert db.in_transaction and db.stale_transaction  # the failed rollback left it open
    with fsqlite.transaction(db):  # ... and the next transaction clears it first instead of being stuck
        db.execute("INSERT INTO t VALUES (2)")
    assert [x for (x,) in db.execute("SELECT x FROM t")] == [2]


def test_a_rollback_that_still_fails_keeps_the_connection_refusing(tmp_path: Path) -> None:
    db = flaky(tmp_path / "db")
    db.fail_rollbacks = 2
    with pytest.raises(KeyError), fsqlite.transaction(db):
        raise KeyError("k")
    # The leftover cannot be rolled back either: said, and nothing of the new transaction is written.
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"), fsqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (3)")
    with fsqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (4)")
    assert [x for (x,) in db.execute("SELECT x FROM t")] == [4]


def _deferred_fk(db: sqlite3.Connection, table: str) -> None:
    """Make every insert into ``table`` fail at COMMIT (a deferred foreign key that never resolves)."""
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    db.execute(f"CREATE TRIGGER dangling AFTER INSERT ON {table} BEGIN INSERT INTO child VALUES (42); END")


def test_a_failing_commit_is_rolled_back_and_raised(tmp_path: Path) -> None:
    db = flaky(tmp_path / "db")
    _deferred_fk(db, "t")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), fsqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (1)")
    assert not db.in_transaction and count(db) == 0
    other = fsqlite.connect(tmp_path / "db")  # the write lock was released, not held by a dead transaction
    with fsqlite.transaction(other):
        other.execute("DROP TRIGGER dangling")
        other.execute("INSERT INTO t VALUES (5)")
    other.close()
    assert count(db) == 1


def test_transactions_do_not_nest(tmp_path: Path) -> None:
    db = flaky(tmp_path / "db")
    with fsqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(RuntimeError, match="do not nest"), fsqlite.transaction(db):
            pass
        db.execute("INSERT INTO t VALUES (2)")
    assert count(db) == 2  # the outer one was neither rolled back nor committed early


def test_a_full_database_leaves_the_batch_out_and_the_store_usable(tmp_path: Path) -> None:
    """SQLITE_FULL for real: the page limit stands in for a full disk."""
    store = Store(tmp_path / "flightlog.db")
    store.apply([RunStart("r", "r", 0.0)])
    (pages,) = store.db.execute("PRAGMA page_count").fetchone()
    store.db.execute(f"PRAGMA max_page_count={pages + 2}")
    big = [Metrics("r", s, 0.0, {f"key/{i}": float(i) for i in range(50)}) for s in range(200)]
    with pytest.raises(sqlite3.OperationalError, match="full"), store.transaction():
        store.apply(big)
        store.save_cursor("store", 1, 2, 3)
    assert store.load_cursor("store") is None and list(store.metric_points("r")) == []
    with store.transaction():
        store.apply([Metrics("r", 0, 0.0, {"loss": 1.0})])
        store.save_cursor("store", 1, 2, 3)
    assert store.load_cursor("store") == (1, 2, 3) and len(list(store.metric_points("r"))) == 1
    store.close()


# --- the checkpoint registry uses the same helper ------------------------------------------------------------


def _spec(path: Path) -> dict[str, Any]:
    return {"path": str(path), "epoch": 0, "step": 1, "codec": "zstd", "level": 1}


def test_registry_failing_rollback_keeps_the_original_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db")
    reg.db.close()
    reg.db = sqlite3.connect(tmp_path / "registry.db", isolation_level=None, factory=FlakyConnection)
    reg.db.fail_rollbacks = 1
    spec = _spec(tmp_path / "a.safetensors.zst")
    del spec["epoch"]  # begin fails inside its transaction
    with pytest.raises(KeyError, match="epoch"):  # not the ROLLBACK's "disk I/O error"
        reg.begin(spec, "tmp")
    reg.begin(_spec(tmp_path / "b.safetensors.zst"), "tmp")  # the connection is not stuck
    assert [r["path"] for r in reg.entries(None, ("writing",))] == [str(tmp_path / "b.safetensors.zst")]
    reg.close()


def test_registry_failing_commit_does_not_leave_the_connection_stuck(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db")
    _deferred_fk(reg.db, "checkpoints")
    with pytest.raises(sqlite3.IntegrityError):
        reg.begin(_spec(tmp_path / "a.safetensors.zst"), "tmp")
    assert not reg.db.in_transaction
    reg.db.execute("DROP TRIGGER dangling")
    reg.begin(_spec(tmp_path / "b.safetensors.zst"), "tmp")
    assert [r["path"] for r in reg.entries(None, ("writing",))] == [str(tmp_path / "b.safetensors.zst")]
    reg.close()


# --- the Store -----------------------------------------------------------------------------------------------


def test_one_store_shared_by_threads(tmp_path: Path) -> None:
    """Writers in transactions and readers on one Store from several threads: the lock keeps them apart
    (unguarded, a second thread's BEGIN lands inside the first one's transaction)."""
    store = Store(tmp_path / "flightlog.db")
    store.apply([RunStart("r", "r", 0.0)])

    def write(n: int) -> None:
        for i in range(100):
            with store.transaction():
                store.apply([Metrics("r", n * 1000 + i, 0.0, {"loss": float(i)})])
                store.save_cursor(f"sink{n}", 0, i, i)

    def read() -> None:
        for _ in range(200):
            store.run_states()
            store.metric_series("r", "loss")

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(write, n) for n in range(3)] + [pool.submit(read)]
    for job in jobs:
        job.result()  # raises what the thread raised
    assert len(store.metric_series("r", "loss")) == 300
    assert [store.load_cursor(f"sink{n}") for n in range(3)] == [(0, 99, 99)] * 3
    store.close()


def test_what_the_monitor_and_plots_read(tmp_path: Path) -> None:
    path = tmp_path / "flightlog.db"
    store = Store(path)
    store.apply([
        RunStart("a", "first", 10.0, config={"monitoring": {"interval_seconds": 2.5}}, pid=7, rank=1, host="h",
                 metadata={"environment": {"env": {"CUDA_VISIBLE_DEVICES": "1"}}}),
        RunStart("b", "second", 20.0),
        Metrics("a", 3, 0.0, {"loss": 1.0, "bad": float("inf")}),
        Metrics("a", 1, 0.0, {"loss": 2.0, "bad": float("nan")}),
        SystemStats("a", 0.0, {"system/cpu_percent": 5.0}, 99),
        RunEnd("b", "completed", 30.0),
    ])
    store.db.execute("UPDATE runs SET config='not json' WHERE run_id='b'")
    store.close()
    ro = Store(path, readonly=True)
    assert ro.run_states() == [RunState("a", "running", 10.0, None, 7, 1, "h"),
                               RunState("b", "completed", 20.0, 30.0, 0, 0, "")]
    assert [r.run_id for r in ro.run_states("running")] == ["a"]
    assert ro.run_config("a") == {"monitoring": {"interval_seconds": 2.5}}
    assert ro.run_config("b") == {} and ro.run_config("nope") == {}
    assert ro.run_metadata("a")["environment"]["env"] == {"CUDA_VISIBLE_DEVICES": "1"}
    assert sorted(ro.metric_keys("a")) == ["bad", "loss", "system/cpu_percent"]
    assert ro.metric_series("a", "loss") == [(1, 2.0), (3, 1.0)]
    assert ro.metric_series("a", "bad") == []  # NaN and infinities are not drawn
    assert ro.last_step("a") == 3 and ro.last_step("a", skip_prefix="") == 99 and ro.last_step("b") is None
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.db.execute("DELETE FROM runs")
    ro.close()


def test_monitor_and_plots_keep_one_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection per call: ticks of the plot service and the monitor reuse the one each opened."""
    from flightlog.agent.monitor import Monitor

    data = tmp_path / "data"
    data.mkdir()
    paths = AgentPaths(data_dir=data, socket=tmp_path / "s", ring_dir=tmp_path / "r", spill_dir=data / "sp")
    store = Store(paths.store)
    store.apply([RunStart("live", "x", time.time(), config={"monitoring": {"plot_every_minutes": 1}}),
                 Metrics("live", 0, 0.0, {"loss": 1.0}), Metrics("live", 1, 0.0, {"loss": 0.5})])
    store.close()
    opened: list[str] = []
    real = sqlite3.connect

    def counting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counting)
    clock = [0.0]
    svc = PlotService(paths, lambda ev: None, clock=lambda: clock[0])
    mon = Monitor(paths, list, lambda ev: None, {"monitoring": {"disk_free_floor_bytes": 0}})
    rendered = 0
    for _ in range(3):
        rendered += svc.tick()
        svc.pending()
        mon.tick([])
        clock[0] += 61
    assert len(opened) == 2, opened  # one read-only connection each
    assert rendered == 2  # periodic renders at 61 s and 122 s read the store too
    svc.close()
    mon.close()


def test_paths_with_uri_characters(tmp_path: Path) -> None:
    """A read-only open goes through a file: URI; '#', '?' and '%' in the path must not cut it short."""
    data = tmp_path / "exp #1?x=%41"
    store = Store(data / "flightlog.db")
    store.apply([RunStart("r", "x", 0.0), Metrics("r", 0, 0.0, {"loss": 1.0}), Metrics("r", 1, 0.0, {"loss": 2.0})])
    store.close()
    assert [p.name for p in render_plots(data / "flightlog.db", "r", tmp_path / "out")] == ["loss.png", "loss_log.png"]
    with Registry(data / "registry.db") as reg:
        reg.begin(_spec(data / "a.safetensors.zst"), "tmp")
    with Registry(data / "registry.db", readonly=True) as reg:
        assert len(reg.entries(None, ("writing",))) == 1


# --- defaults live in the config Structs ---------------------------------------------------------------------


def test_decode_config_is_lenient_per_key() -> None:
    cfg, problems = decode_config({
        "monitoring": {"interval_seconds": -1, "create_plots": False, "from_a_newer_sdk": 1},
        "agent": {"ring_bytes": 3, "idle_exit_seconds": 1.5}, "wal": None, "tags": ["a"], "unknown": {},
    })
    assert cfg.monitoring.create_plots is False and cfg.agent.idle_exit_seconds == 1.5 and cfg.tags == ["a"]
    assert cfg.monitoring.interval_seconds == Config().monitoring.interval_seconds  # the bad one: its default
    assert cfg.agent.ring_bytes == Config().agent.ring_bytes and cfg.wal == Config().wal
    assert [p.split(":")[0] for p in problems] == [
        "monitoring.interval_seconds", "monitoring.from_a_newer_sdk", "agent.ring_bytes", "unknown"]
    assert "power of two" in problems[2] and "its default is used" in problems[2]
    assert decode_config(None) == (Config(), [])
    assert decode_config("junk")[0] == Config()


def test_agent_settings_come_from_the_structs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flightlog.agent")
    default = AgentSettings.from_config({})
    wal = Config().wal
    assert (default.fsync, default.fsync_ms, default.segment_bytes, default.max_wal_bytes) == (
        wal.fsync, wal.fsync_ms, wal.segment_bytes, wal.max_bytes)
    assert default.idle_exit_seconds == Config().agent.idle_exit_seconds
    s = AgentSettings.from_config({"wal": {"fsync": "sometimes", "fsync_ms": 7}, "agent": {"idle_exit_seconds": 2}},
                                  sidecar=True)
    assert s.fsync == wal.fsync and s.fsync_ms == 7 and s.idle_exit_seconds == 2.0 and s.sidecar
    assert "wal.fsync" in caplog.text  # an invalid value is said, not passed on to the WAL


def test_monitor_reads_a_run_settings_from_the_structs(tmp_path: Path) -> None:
    from flightlog.agent.monitor import Monitor

    data = tmp_path / "data"
    data.mkdir()
    paths = AgentPaths(data_dir=data, socket=tmp_path / "s", ring_dir=tmp_path / "r", spill_dir=data / "sp")
    store = Store(paths.store)
    store.apply([RunStart("bad", "x", time.time(), pid=os.getpid(), host=socket.gethostname(),
                          config={"monitoring": {"interval_seconds": "often", "log_gpu_usage": False},
                                  "checkpointing": {"checkpoint_dir": "relative/ckpt"}})])
    store.close()
    mon = Monitor(paths, list, lambda ev: None, {"monitoring": {"disk_free_floor_bytes": 0}})
    mon.tick([])
    info = mon.runs["bad"]
    mon.close()
    assert info.interval == Config().monitoring.interval_seconds
    assert info.config.monitoring.log_gpu_usage is False
    assert info.dirs(data) == {"data": str(data)}  # a relative dir means nothing in the agent's cwd


_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
_KEYS = st.sampled_from([*Config.__struct_fields__, "interval_seconds", "ring_bytes", "fsync", "x"]) | st.text(max_size=8)


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return _SCALARS | st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=6)


_JSONISH = _nested(_nested(_nested(_SCALARS)))  # three levels: a config's top, its sections, their values


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(_KEYS, _JSONISH, max_size=8) | _JSONISH)
def test_decode_config_takes_any_builtins(data: Any) -> None:
    """A run's config comes from another process: whatever it holds, the agent gets a valid Config."""
    cfg, problems = decode_config(data)
    assert isinstance(cfg, Config) and all(isinstance(p, str) for p in problems)
    msgspec.convert(msgspec.to_builtins(cfg), Config)  # every value in it validates


@settings(max_examples=100, deadline=None)
@given(interval=st.floats(0.01, 1e6), floor=st.integers(0, 2**62), plots=st.booleans(),
       fsync=st.sampled_from(["interval", "always", "never"]), tags=st.lists(st.text(max_size=5), max_size=3))
def test_decode_config_round_trips_a_valid_config(interval: float, floor: int, plots: bool, fsync: str,
                                                  tags: list[str]) -> None:
    cfg = msgspec.convert({"tags": tags, "monitoring": {"interval_seconds": interval, "disk_free_floor_bytes": floor,
                                                        "create_plots": plots}, "wal": {"fsync": fsync}}, Config)
    assert decode_config(config_to_dict(cfg)) == (cfg, [])
    assert decode_config(msgspec.json.decode(msgspec.json.encode(cfg))) == (cfg, [])  # as the store keeps it


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60) | st.sampled_from(
    ["[1]", "null", "1e999", "NaN", '{"a": 1}', '{"a": [1, {"b": null}]}', "[" * 100_000 + "]" * 100_000,
     '{"a": ' * 100_000 + "1" + "}" * 100_000]))
def test_a_stored_json_column_reads_as_an_object_or_nothing(tmp_path_factory: pytest.TempPathFactory,
                                                            text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "json-columns.db"
    store = Store(path)
    store.apply([RunStart("r", "r", 0.0)])
    store.db.execute("UPDATE runs SET config=?, metadata=? WHERE run_id='r'", (text, text))
    config, metadata = store.run_config("r"), store.run_metadata("r")
    store.close()
    assert isinstance(config, dict) and config == metadata
    assert decode_config(config)[0] is not None


def test_threads_opening_a_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    """The agent's sink threads open the store together when it does not exist yet: switching a new
    database to WAL journalling must wait for the other connections, not fail with "database is locked"."""
    import threading

    from flightlog.proto.sqlite import connect

    for i in range(20):
        path = tmp_path / f"fresh-{i}.db"
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def open_one(p: Path = path, b: threading.Barrier = barrier, errors: list[BaseException] = errors) -> None:
            b.wait()
            try:
                db = connect(p)
                db.execute("CREATE TABLE IF NOT EXISTS t (x)")
                db.close()
            except BaseException as exc:  # collected: a thread's exception would otherwise vanish
                errors.append(exc)

        threads = [threading.Thread(target=open_one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"attempt {i}: {errors[0]!r}"


@pytest.mark.parametrize(("ends", "status"), [(("completed", "completed"), "completed"),
                                              (("completed", "crashed"), "crashed")])
def test_a_node_store_ends_a_multi_node_run_when_its_own_ranks_ended(tmp_path: Path, ends: tuple[str, str],
                                                                     status: str) -> None:
    """Node 1 of a 2-node, 4-rank job sees ranks 2 and 3 only: its store ends the run once they ended (it
    would wait forever for ranks 0 and 1, whose ends go to node 0's agent)."""
    with Store(tmp_path / "db.sqlite") as store:
        with store.transaction():
            store.apply([RunStart("job", "j", 1.0, rank=r, world_size=4, nodes=2, node_rank=1, local_world_size=2)
                         for r in (2, 3)])
            store.apply([RunEnd("job", ends[0], 2.0, rank=2)])
        assert store.run("job")["status"] == "running"  # rank 3 still runs
        with store.transaction():
            store.apply([RunEnd("job", ends[1], 3.0, rank=3)])
        run = store.run("job")
        assert run["status"] == status and (status == "completed" or run["error"].startswith("rank 3 crashed"))
