"""Issue 11, item 5 (and item 2's last sentence): a job over many nodes, one agent per node, is one MLflow run
on a tracking server backed by PostgreSQL, every point exactly once, even when one node's agent is SIGKILLed
and restarted mid-run; each node's system metrics are its own (``system/<node>/...``). Two agents with their
own data dirs and sockets, and FLIGHTLOG_NODE naming them, stand for two nodes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, new_id
from conftest_backends import MlflowServer, ended_mlflow_runs
from hypothesis import given, settings
from hypothesis import strategies as st
from test_monitor import make_paths

from flightlog.agent.monitor import Monitor
from flightlog.agent.sinks._common import RankView, RunRegistry
from flightlog.agent.sinks.mlflow_sink import NODE_END_TAG, _node_ends
from flightlog.agent.store import RankEnd, Store
from flightlog.proto.events import Metrics, RunEnd, RunStart, SystemStats
from flightlog.proto.names import node_name
from flightlog.proto.paths import resolve_paths


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


# --- two nodes, one MLflow run on PostgreSQL ------------------------------------------------------------

N = 120  # points per rank; half before an agent is killed, half after

# A rank as torchrun starts it on one node of two (its launcher variables; the logic under test is flightlog's
# agents and sinks, so no torch.distributed): it logs half its points, waits for the go file, logs the rest.
RANK = """
    import json, os, sys, time, flightlog
    cfg, n, go = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    with flightlog.experiment_tracking("multinode", cfg) as t:
        print(f"RUN {t.run_id}", flush=True)  # one write: ranks share the pipe
        for i in range(n):
            if i == n // 2:
                t.flush()
                while not os.path.exists(go):
                    time.sleep(0.05)
            t.log_metrics({"loss": i + rank / 10}, step=i)
"""


class Node:
    """One "node": its agent's data dir and socket (so its own WAL, rings and sink cursors), and its name."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.sock_dir = Path(tempfile.mkdtemp(prefix=f"fl-{name}-", dir="/tmp"))
        self.env = {"FLIGHTLOG_DATA_DIR": str(root / f"node-{name}"), "FLIGHTLOG_NODE": name,
                    "FLIGHTLOG_AGENT_SOCKET": str(self.sock_dir / "a.sock")}
        (root / f"node-{name}").mkdir(mode=0o700)
        self.paths = resolve_paths(self.env["FLIGHTLOG_DATA_DIR"], self.env["FLIGHTLOG_AGENT_SOCKET"])
        self.agent: AgentProcess | None = None

    def start_agent(self, monkeypatch: pytest.MonkeyPatch) -> AgentProcess:
        for k, v in self.env.items():  # the agent reads them (environment first), and so do the ranks
            monkeypatch.setenv(k, v)
        self.agent = AgentProcess(self.paths).start()
        return self.agent

    def rank(self, rank: int, node_rank: int, job: str, cfg: dict[str, Any], go: Path) -> subprocess.Popen[str]:
        env = {**os.environ, **self.env, "TORCHELASTIC_RUN_ID": job, "RANK": str(rank), "WORLD_SIZE": "4",
               "LOCAL_RANK": str(rank % 2), "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(node_rank),
               "GROUP_WORLD_SIZE": "2"}
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(RANK), json.dumps(cfg), str(N), str(go)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        shutil.rmtree(self.paths.ring_dir, ignore_errors=True)


def _histories(client: Any, run_id: str) -> dict[int, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"rank{k}/loss")) for k in range(4)}


def _tagged(client: Any, experiment: str, job: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`flightlog.run_id` = '{job}'") if exp else []


def test_two_nodes_one_agent_killed_make_one_mlflow_run_on_postgres_every_point_once(
        mlflow_pg: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_pg.uri)
    job, experiment = f"mn{new_id()}", f"multinode-{new_id()}"
    cfg = {"tracking": {"use_tensorboard": False, "use_mlflow": True, "mlflow_tracking_uri": mlflow_pg.uri,
                        "mlflow_experiment_name": experiment},
           "distributed": {"log_ranks": "all"}, "monitoring": {"interval_seconds": 0.5},
           "agent": {"autostart": False}}
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    go = tmp_path / "go"
    ranks: list[subprocess.Popen[str]] = []
    try:
        a.start_agent(monkeypatch)
        agent_b = b.start_agent(monkeypatch)
        ranks = [a.rank(0, 0, job, cfg, go), a.rank(1, 0, job, cfg, go), b.rank(2, 1, job, cfg, go),
                 b.rank(3, 1, job, cfg, go)]
        deadline = time.monotonic() + 120
        while True:  # both nodes delivering into the job's one MLflow run
            runs = _tagged(client, experiment, f"te-{job}")
            hist = _histories(client, runs[0].info.run_id) if runs else {}
            if hist and hist[2] and hist[0]:
                break
            assert time.monotonic() < deadline, f"nothing delivered: {b.agent and b.agent.read_log()[-2000:]}"
            time.sleep(0.3)
        agent_b.kill()  # SIGKILL, mid-run: its last batch may be in MLflow without its cursor committed
        go.touch()  # the ranks log their second half; node b's wait in its rings for the new agent
        time.sleep(1.0)
        b.start_agent(monkeypatch)
        outs = [p.communicate(timeout=180) for p in ranks]
        for p, (_, err) in zip(ranks, outs):
            assert p.returncode == 0, err
            assert "Traceback" not in err, err
        expected = {k: [(i, i + k / 10) for i in range(N)] for k in range(4)}
        deadline = time.monotonic() + 120
        while True:
            runs = _tagged(client, experiment, f"te-{job}")
            assert len(runs) == 1, [r.info.run_id for r in runs]  # one MLflow run for the whole job, always
            hist = _histories(client, runs[0].info.run_id)
            if all(len(hist[k]) >= N for k in range(4)):
                break
            assert time.monotonic() < deadline, {k: len(v) for k, v in hist.items()}
            time.sleep(0.3)
        time.sleep(1.0)  # anything re-sent late would show now
        hist = _histories(client, runs[0].info.run_id)
        assert {k: [(s, pytest.approx(v)) for s, v in pts] for k, pts in hist.items()} == expected
        [ml] = ended_mlflow_runs(client, experiment, f"te-{job}")  # ended once both nodes' ranks ended
        assert (ml.info.status, ml.data.tags["flightlog.status"]) == ("FINISHED", "completed")
        assert {k: v.split(",")[0] for k, v in ml.data.tags.items() if k.startswith("flightlog.node_end.")} == {
            "flightlog.node_end.0": '["completed"', "flightlog.node_end.1": '["completed"'}
        assert ml.data.tags["flightlog.node"] == "a"  # created by the node of rank 0
        keys = set(ml.data.metrics)
        assert "system/a/cpu_percent" in keys and "system/b/cpu_percent" in keys  # each node's own
        for node in (a, b):
            assert node.agent is not None and "Traceback" not in node.agent.read_log(), node.agent.read_log()
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
        a.close()
        b.close()


# --- the parts, in this process --------------------------------------------------------------------------


def _node_start(rank: int, node_rank: int) -> RunStart:
    return RunStart("j", "job", 1.0, config={"distributed": {"log_ranks": "all"}}, rank=rank, world_size=4,
                    node=f"n{node_rank}", node_rank=node_rank, nodes=2, local_world_size=2)


def test_a_nodes_view_ends_the_node_once_its_own_ranks_ended(tmp_path: Path) -> None:
    view = RankView(RunRegistry(tmp_path))
    events = [_node_start(3, 1), _node_start(2, 1), Metrics("j", 0, 1.0, {"loss": 1.0}, 3),
              RunEnd("j", "completed", 2.0, rank=2)]
    shown, ranks = view.filter("j", list(enumerate(events)))
    view.save("j", ranks)
    assert [type(ev).__name__ for _, ev in shown] == ["Metrics"]  # a node without rank 0: points, no start
    assert shown[0][1].values == {"rank3/loss": 1.0}  # its joining rank's log_ranks, not "zero"
    shown, _ = view.filter("j", [(9, RunEnd("j", "crashed", 3.0, "killed", rank=3))])
    assert [ev for _, ev in shown] == [RunEnd("j", "crashed", 3.0, "rank 3 crashed: killed", 0, 3)]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=30).map(lambda s: NODE_END_TAG + s), st.text(max_size=200), max_size=5),
       st.integers(0, 9), st.sampled_from(["completed", "failed", "crashed"]))
def test_node_end_tags_of_any_content_never_break_the_sink(tags: dict[str, str], node: int, status: str) -> None:
    good = {**tags, f"{NODE_END_TAG}{node + 10}": "[" * 5000, f"{NODE_END_TAG}{node}": json.dumps([status, "e", 1.5, 2])}
    ends = _node_ends(good)
    assert ends[node] == RankEnd(status, "e", 1.5, 2)
    assert all(isinstance(k, int) for k in ends)
