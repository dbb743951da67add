"""One torchrun job is one run (issue 11, items 1 and 2): every rank joins the run its launcher names, every
metric point keeps its rank, and the run ends once every rank ended — completed, failed naming the rank, or
crashed naming the rank that died. The jobs are real ``torchrun --standalone`` jobs (gloo, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess
from conftest_backends import (  # noqa: F401
    MlflowServer,
    ended_mlflow_runs,
    mlflow_server,
    read_wandb_log,
    tb_accumulator,
    wandb_exit_codes,
    wandb_logs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_crashed import wait_status

from flightlog.agent.sinks._common import RankView, RunRegistry
from flightlog.agent.sinks.wandb_sink import wandb_run_id
from flightlog.agent.store import RankEnd, Store, combine_rank_ends
from flightlog.distributed import job_identity
from flightlog.proto.events import Metrics, RunEnd, RunStart
from flightlog.proto.names import check_run_id

pytest.importorskip("torch.distributed")
pytestmark = [pytest.mark.timeout(240),
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]

N = 50

# argv: config (JSON), points per rank, how rank 1 ends: "ok", "raise" (an exception in the with block),
# "kill" (SIGKILL itself once rank 0 has finished).
SCRIPT = """
    import json, os, signal, sys
    import torch.distributed as dist
    import flightlog

    config, n, how = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with flightlog.experiment_tracking("ddp-job", config) as tracker:
        sys.stdout.write(f"RUN {rank} {tracker.run_id}\\n"); sys.stdout.flush()  # one write: ranks share the pipe
        tracker.log_hyperparameters({"lr": 0.1 + rank})  # rank 0's is the run's (a backend keeps one)
        for i in range(n):
            tracker.log_metrics({"loss": i + rank / 10}, step=i)
        if rank == 1 and how == "raise":
            raise RuntimeError("rank one broke")
        if rank == 1 and how == "kill":
            dist.barrier()  # rank 0 has finished its run
            os.kill(os.getpid(), signal.SIGKILL)
    if how == "kill":
        dist.barrier()
    dist.destroy_process_group()
"""


def torchrun(tmp_path: Path, config: dict[str, Any], how: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         json.dumps(config), str(N), how],
        capture_output=True, text=True, timeout=150,
    )


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def job_run(proc: subprocess.CompletedProcess[str]) -> str:
    ids = {line.split()[1]: line.split()[2] for line in proc.stdout.splitlines() if line.startswith("RUN ")}
    assert set(ids) <= {"0", "1"} and ids, proc.stdout + proc.stderr
    assert len(set(ids.values())) == 1, f"the ranks logged into different runs: {ids}"
    return next(iter(ids.values()))


def exported(run_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in cli("runs", "export", run_id, "--format", "jsonl").splitlines()]


def test_torchrun_job_is_one_completed_run_with_every_ranks_points(agent: AgentProcess, base_config: dict,
                                                                   tmp_path: Path) -> None:
    proc = torchrun(tmp_path, base_config, "ok")
    assert proc.returncode == 0, proc.stderr
    run_id = job_run(proc)
    assert run_id.startswith("te-")
    row = wait_status(agent.paths, run_id, "completed")
    listed = json.loads(cli("runs", "ls", "--json"))
    assert [r["run_id"] for r in listed] == [run_id]  # one job, one run
    assert row["rank"] == 0 and row["name"] == "ddp-job" and row["params"] == {"lr": 0.1}
    points = [p for p in exported(run_id) if p["key"] == "loss"]
    assert Counter(p["rank"] for p in points) == {0: N, 1: N}
    assert sorted(p["value"] for p in points if p["rank"] == 1) == [i + 0.1 for i in range(N)]
    doc = json.loads(cli("runs", "export", run_id, "--format", "json"))
    assert [(r["rank"], r["status"]) for r in doc["ranks"]] == [(0, "completed"), (1, "completed")]


def test_a_rank_that_raises_fails_the_run_naming_it(agent: AgentProcess, base_config: dict,
                                                    tmp_path: Path) -> None:
    proc = torchrun(tmp_path, base_config, "raise")
    assert proc.returncode != 0
    run_id = job_run(proc)
    row = wait_status(agent.paths, run_id, "failed")
    assert "rank 1 failed" in row["error"] and "RuntimeError: rank one broke" in row["error"]
    assert [r["run_id"] for r in json.loads(cli("runs", "ls", "--json"))] == [run_id]


def test_a_rank_killed_ends_the_run_crashed_naming_it_with_every_point(agent: AgentProcess, base_config: dict,
                                                                       tmp_path: Path) -> None:
    proc = torchrun(tmp_path, base_config, "kill")
    assert proc.returncode != 0
    run_id = job_run(proc)
    row = wait_status(agent.paths, run_id, "crashed")
    assert row["error"].startswith("rank 1 crashed") and "rank 0" not in row["error"]
    points = [p for p in exported(run_id) if p["key"] == "loss"]
    assert Counter(p["rank"] for p in points) == {0: N, 1: N}  # the dead rank's too: its ring was drained
    assert [r["run_id"] for r in json.loads(cli("runs", "ls", "--json"))] == [run_id]


def _tb_ended(tb: Path) -> Path:
    deadline = time.monotonic() + 90
    while True:
        ended = [p.parent for p in tb.glob("*/.flightlog-tb.json") if json.loads(p.read_text()).get("ended")]
        if ended:
            return ended[0]
        assert time.monotonic() < deadline, "TensorBoard never ended the run"
        time.sleep(0.2)


def test_every_backend_gets_rank_zeros_points_and_the_crashed_end_once(agent: AgentProcess,  # noqa: F811
                                                                       mlflow_server: MlflowServer,
                                                                       tmp_path: Path) -> None:
    from mlflow import MlflowClient

    wb, tb = tmp_path / "wandb", tmp_path / "tb"
    config = {
        "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(tb),
                     "use_mlflow": True, "mlflow_tracking_uri": mlflow_server.uri, "mlflow_experiment_name": "ddp",
                     "use_wandb": True, "wandb_mode": "offline", "wandb_dir": str(wb), "wandb_project": "ddp"},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "agent": {"autostart": False},
    }
    run_id = job_run(torchrun(tmp_path, config, "kill"))
    wait_status(agent.paths, run_id, "crashed")

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = ended_mlflow_runs(client, "ddp", run_id)
    assert len(runs) == 1
    ml = runs[0]
    assert ml.info.status == "FAILED" and ml.data.tags["flightlog.status"] == "crashed"
    assert ml.data.tags["flightlog.error"].startswith("rank 1 crashed")
    assert ml.data.params["lr"] == "0.1"  # rank 0's
    assert sorted(m.value for m in client.get_metric_history(ml.info.run_id, "loss")) == [float(i) for i in range(N)]

    assert wandb_exit_codes(wb, wandb_run_id(run_id)) == [1]

    acc = tb_accumulator(_tb_ended(tb))
    [status_tag] = [t for t in acc.Tags()["tensors"] if t.startswith("flightlog/status")]
    statuses = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(status_tag)]
    assert len(statuses) == 1 and "crashed" in statuses[0] and "rank 1" in statuses[0]
    assert sorted(e.value for e in acc.Scalars("loss")) == [float(i) for i in range(N)]  # rank 0's only


def test_log_ranks_all_gives_tensorboard_a_directory_per_rank(agent: AgentProcess, base_config: dict,
                                                              tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    config = {**base_config, "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(tb)},
              "distributed": {"log_ranks": "all"}}
    run_id = job_run(torchrun(tmp_path, config, "ok"))
    wait_status(agent.paths, run_id, "completed")
    run_dir = _tb_ended(tb)
    for rank in (0, 1):
        acc = tb_accumulator(run_dir / f"rank{rank}")
        assert sorted(e.value for e in acc.Scalars("loss")) == pytest.approx([i + rank / 10 for i in range(N)])
    assert "loss" not in tb_accumulator(run_dir).Tags()["scalars"]


# --- the parts, in this process ---------------------------------------------------------------------


def test_job_identity_from_the_launchers_environment() -> None:
    te = job_identity({"TORCHELASTIC_RUN_ID": "5f1c", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert te == ("te-5f1c", 3, 1, 4)
    slurm = job_identity({"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"})
    assert slurm == ("slurm-812.2", 5, 0, 8)
    assert job_identity({}) == (None, 0, 0, 1)  # a plain process: its own run
    assert job_identity({"TORCHELASTIC_RUN_ID": "none", "RANK": "1"}).run_id is None  # would be shared by all
    assert job_identity({"FLIGHTLOG_RUN_ID": "mine", "TORCHELASTIC_RUN_ID": "x"}).run_id == "mine"
    odd = job_identity({"TORCHELASTIC_RUN_ID": "a/b c" * 40}).run_id
    assert odd is not None and check_run_id(odd) == odd  # encoded: a valid id, the same on every rank
    assert odd == job_identity({"TORCHELASTIC_RUN_ID": "a/b c" * 40}).run_id


def test_rank_ends_combine_once_every_rank_ended() -> None:
    ok = RankEnd("completed", "", 1.0, 0)
    assert combine_rank_ends("r", 2, {0: ok}) is None
    assert combine_rank_ends("r", 2, {0: ok, 1: ok}) == RunEnd("r", "completed", 1.0, "", 0, 0)
    end = combine_rank_ends("r", 3, {0: RankEnd("crashed", "died", 2.0, 1), 1: ok, 2: RankEnd("failed", "tb", 3.0, 0)})
    assert end is not None and end.status == "failed" and end.rank == 2 and end.dropped == 1
    assert end.error == "rank 0 crashed: died\nrank 2 failed: tb"


def _start(rank: int, log_ranks: str = "zero") -> RunStart:
    return RunStart("r", "job", 1.0, config={"distributed": {"log_ranks": log_ranks}}, rank=rank, world_size=2)


@pytest.mark.parametrize("log_ranks", ["zero", "all"])
def test_backends_see_rank_zeros_start_their_ranks_points_and_one_end(tmp_path: Path, log_ranks: str) -> None:
    view = RankView(RunRegistry(tmp_path))
    events = [_start(1, log_ranks), _start(0, log_ranks), Metrics("r", 0, 1.0, {"loss": 1.0}, 0),
              Metrics("r", 0, 1.0, {"loss": 2.0}, 1), RunEnd("r", "completed", 2.0, rank=1)]
    shown, ranks = view.filter("r", list(enumerate(events)))
    view.save("r", ranks)
    kinds = [(type(ev).__name__, getattr(ev, "rank", None)) for _, ev in shown]
    values = [ev.values for _, ev in shown if isinstance(ev, Metrics)]
    assert kinds[0] == ("RunStart", 0) and ("RunEnd", 1) not in kinds  # rank 1's end alone ends nothing
    assert values == ([{"loss": 1.0}] if log_ranks == "zero" else [{"rank0/loss": 1.0}, {"rank1/loss": 2.0}])
    # After a restart (a new view on the same registry), rank 0's end ends the run, once.
    again = RankView(RunRegistry(tmp_path))
    shown, ranks = again.filter("r", [(9, RunEnd("r", "completed", 3.0, rank=0))])
    again.save("r", ranks)
    assert [ev for _, ev in shown] == [RunEnd("r", "completed", 3.0, "", 0, 0)]
    assert again.filter("r", [(10, RunEnd("r", "crashed", 4.0, rank=0))])[0] == []


def test_store_keeps_rank_zeros_start_and_ends_the_run_after_its_last_rank(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        with store.transaction():
            store.apply([_start(1), _start(0), RunEnd("r", "completed", 2.0, rank=0)])
        assert store.run("r")["status"] == "running"
        with store.transaction():
            store.apply([RunEnd("r", "crashed", 3.0, "killed", rank=1), RunEnd("r", "completed", 4.0, rank=1)])
        row = store.run("r")
        assert (row["status"], row["error"], row["rank"]) == ("crashed", "rank 1 crashed: killed", 0)


def test_a_store_from_before_ranks_gets_the_column_and_exports_rank_zero(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE metrics (run_id TEXT, key TEXT, step INTEGER, ts REAL, value REAL)")
    db.execute("INSERT INTO metrics VALUES ('r', 'loss', 0, 1.0, 0.5)")
    db.commit()
    db.close()
    with Store(tmp_path / "old.db") as store:
        with store.transaction():
            store.apply([Metrics("r", 1, 2.0, {"loss": 0.25}, 3)])
        assert [(p["step"], p["rank"]) for p in store.metric_points("r")] == [(0, 0), (1, 3)]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=40), st.text(max_size=40))
def test_any_launcher_id_gives_a_valid_run_id_the_same_on_every_rank(elastic: str, job: str, step: str) -> None:
    for env in ({"TORCHELASTIC_RUN_ID": elastic}, {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "RANK": step}):
        first = job_identity(env)
        assert first == job_identity(dict(env))
        if first.run_id is not None:
            assert check_run_id(first.run_id) == first.run_id


def test_a_rank_variable_of_non_ascii_digits_is_not_a_rank() -> None:
    """Found by the launcher-id property test: '²' is a digit to str.isdigit() but not to int()."""
    assert job_identity({"RANK": "²", "TORCHELASTIC_RUN_ID": "j1"}).rank == 0
