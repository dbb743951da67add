"""`flightlog status` after the agent has gone: read from the data directory — each sink's cursor, its
backlog in the WAL (events and bytes), its last error and state (``health.json``), the alerts, and the runs
with undelivered events; `--json` for scripts."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AgentProcess
from conftest_backends import free_port

import flightlog
from flightlog.proto.paths import AgentPaths

pytestmark = pytest.mark.timeout(180)
STEPS = 120


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "status", *args], capture_output=True,
                          text=True, timeout=60)


def test_status_without_agent_reads_the_data_dir(agent_paths: AgentPaths, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: W&B retries
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    config = {
        "tracking": {"use_wandb": True, "wandb_mode": "online", "wandb_dir": str(tmp_path / "wandb"),
                     "use_tensorboard": False},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "monitoring": {"disk_free_floor_bytes": 1 << 60, "interval_seconds": 0.5},  # an alert for sure
        "agent": {"autostart": False},
        "notify": {"after_seconds": 1.0},
    }
    agent = AgentProcess(agent_paths).start()
    try:
        with flightlog.experiment_tracking("offline-status", config) as t:
            for s in range(STEPS):
                t.log_metrics({"loss": float(s)}, step=s)
            deadline = time.monotonic() + 60
            while "low disk space" not in json.dumps(t.health()["alerts"]) or \
                    t.health()["sinks"]["wandb"]["status"] != "retrying":
                assert time.monotonic() < deadline, t.health()
                time.sleep(0.2)
            said = ""
            while "retrying for" not in said:  # W&B retried for notify.after_seconds: the trainer is told
                assert time.monotonic() < deadline, said
                time.sleep(0.2)
                said += capsys.readouterr().err
            [line] = [ln for ln in said.splitlines() if "retrying for" in ln]
            # (W&B's own reason varies: its timeout first, then "run ID ... is in use" from wandb-core)
            assert line.startswith("flightlog: W&B: ") and "events kept in the WAL" in line, line
            assert f"flightlog wal replay {agent_paths.wal_dir} --to wandb=online --run {t.run_id}" in line, line
        run_id = t.run_id
    finally:
        agent.stop()  # its last state goes to health.json as it stops
    assert (agent_paths.data_dir / "health.json").exists()

    out = status("--json")
    assert out.returncode == 1, out.stderr  # no agent runs: exit 1, as before, with the data dir's report
    doc = json.loads(out.stdout)
    assert doc["running"] is False and doc["data_dir"] == str(agent_paths.data_dir)
    wandb, store = doc["sinks"]["wandb"], doc["sinks"]["store"]
    assert store["backlog_events"] == 0 and store["cursor"]["seq"] > 0
    # W&B got nothing: every event of the run is behind its cursor, in the WAL's bytes.
    assert wandb["backlog_events"] >= STEPS + 2 and wandb["backlog_bytes"] > 0, wandb
    assert wandb["state"] in ("retrying", "open circuit") and wandb["last_error"], wandb
    assert wandb["parked"] == []
    assert doc["undelivered_runs"][run_id]["sinks"] == {"wandb": wandb["backlog_events"]}
    assert doc["undelivered_runs"][run_id]["name"] == "offline-status"
    assert any("low disk space" in a for a in doc["alerts"]), doc["alerts"]
    assert "f" * 40 not in out.stdout

    text = status()
    assert text.returncode == 1 and "agent: not running" in text.stdout
    assert f"{run_id} 'offline-status': wandb {wandb['backlog_events']}" in text.stdout, text.stdout
    assert "ALERT: low disk space" in text.stdout and f"last error: {wandb['last_error'][:40]}" in text.stdout


def test_status_of_an_empty_data_dir(tmp_path: Path) -> None:
    out = status("--json", "--data-dir", str(tmp_path / "nothing"), "--socket", str(tmp_path / "none.sock"))
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["running"] is False and "sinks" not in doc


# --- health.json is outside bytes to the CLI: any content gives a report, never a traceback ---------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flightlog.agent.status_offline import offline_status, print_offline  # noqa: E402
from flightlog.proto.config import parse_address  # noqa: E402
from flightlog.proto.paths import resolve_paths  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                 max_size=4), max_leaves=20)
_shaped = st.fixed_dictionaries({}, optional={"pid": _json, "written_at": _json, "alerts": _json,
                                              "sinks": st.dictionaries(st.sampled_from(["store", "wandb"]), _json)})


def test_any_health_file_gives_a_report(tmp_path: Path) -> None:
    paths = resolve_paths(str(tmp_path), str(tmp_path / "a.sock"))

    @settings(max_examples=100, deadline=None)
    @given(content=st.binary(max_size=200) | _shaped.map(lambda d: json.dumps(d).encode()))
    def check(content: bytes) -> None:
        (tmp_path / "health.json").write_bytes(content)
        report = offline_status(paths)
        assert all(isinstance(a, str) for a in report["alerts"])
        print_offline(report, str)

    check()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_metrics_address_parses_or_says_why(text: str) -> None:
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        assert "host:port" in str(exc)
    else:
        assert host and 0 < port < 65536
