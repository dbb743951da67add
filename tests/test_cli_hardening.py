"""The `flightlog` CLI as a new user meets it, run as a real subprocess against a data dir that a real agent
filled from real trackers: the same --config/--data-dir on every command, `wal inspect DATA_DIR`, JSON in
every state, ambiguous run names refused, user strings escaped, only the sinks runs use, one "no agent" line."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import AgentProcess
from test_pipeline import wait_points

import flightlog
from flightlog.proto.paths import AgentPaths, resolve_paths

SPOOF = "spoof\nfake-run ok\u202eevil\x1b[2J"
COMMANDS = [["agent"], ["status"], ["wal", "inspect"], ["wal", "replay"], ["runs", "ls"], ["runs", "export"], ["plot"],
            ["ckpt", "ls"], ["ckpt", "show"], ["ckpt", "verify"], ["ckpt", "export"]]


@dataclass
class Filled:
    paths: AgentPaths
    agent: AgentProcess
    config: Path  # a config file in another directory naming the data dir by absolute path
    exp: str  # run id of the run named "exp" (loss and acc at steps 0..4)
    dups: list[str]  # two runs named "dup"
    spoof: str
    tb: str  # a run that uses TensorBoard
    ckpt: str  # the checkpoint of "exp" ("" without torch)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI; the environment has no FLIGHTLOG_* variable unless the test passes one."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHTLOG_")}
    return subprocess.run([sys.executable, "-m", "flightlog.agent.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**base, **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    root = tmp_path_factory.mktemp("cli")
    sock_dir = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    data = root / "data"
    data.mkdir(mode=0o700)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLIGHTLOG_DATA_DIR", str(data))
        mp.setenv("FLIGHTLOG_AGENT_SOCKET", str(sock_dir / "a.sock"))
        paths = resolve_paths()
        agent = AgentProcess(paths).start()
        try:
            cfg = {"tracking": {"use_tensorboard": False}, "checkpointing": {"checkpoint_dir": str(root / "ckpt")},
                   "agent": {"autostart": False}}
            ids: dict[str, str] = {}
            try:
                import torch
            except ImportError:
                torch = None  # type: ignore[assignment]
            ckpt = ""
            for name, run_id in (("exp", "exp-run"), ("dup", "dup-one"), ("dup", "dup-two"), (SPOOF, "spoof-run")):
                with flightlog.ExperimentTracker(name, cfg, run_id=run_id) as t:
                    for step in range(5):
                        t.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
                    t.set_tags({"note": "tag\u202ereversed"})
                    if run_id == "exp-run" and torch is not None:
                        ckpt = t.save_checkpoint(torch.nn.Linear(2, 2), epoch=1, step=4, val_loss=0.5)
                ids[run_id] = t.run_id
            tb_cfg = {**cfg, "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(root / "tb")}}
            with flightlog.ExperimentTracker("tb", tb_cfg, run_id="tb-run") as t:
                t.log_metrics({"loss": 1.0}, step=0)
            for run_id, n in (("exp-run", 10), ("dup-one", 10), ("dup-two", 10), ("spoof-run", 10), ("tb-run", 1)):
                wait_points(paths, run_id, n)
            cfg_dir = root / "configs"
            cfg_dir.mkdir()
            config = cfg_dir / "flightlog.yaml"
            config.write_text(yaml.safe_dump({"agent": {"data_dir": str(data), "socket": str(paths.socket)}}))
            yield Filled(paths, agent, config, "exp-run", ["dup-one", "dup-two"], "spoof-run", "tb-run", str(ckpt))
        finally:
            agent.stop()
            shutil.rmtree(sock_dir, ignore_errors=True)
            shutil.rmtree(paths.ring_dir, ignore_errors=True)


# --- item 16: one way to say where the data is -----------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_config_and_data_dir(command: list[str]) -> None:
    out = cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--config", "--data-dir", "--socket"):
        assert option in out.stdout, f"`flightlog {' '.join(command)}` has no {option}"


def test_ckpt_ls_with_config_and_with_data_dir(filled: Filled, tmp_path: Path) -> None:
    by_config = cli("ckpt", "ls", "--config", str(filled.config))
    by_dir = cli("ckpt", "ls", "--data-dir", str(filled.paths.data_dir))
    assert by_config.returncode == 0, by_config.stderr
    assert by_config.stdout == by_dir.stdout and by_config.stdout.startswith("STATE")
    if importlib.util.find_spec("torch") is not None:
        assert filled.ckpt and filled.ckpt in by_config.stdout and "val_loss=0.5" in by_config.stdout


def test_ckpt_ls_dir_error_names_the_dir_and_the_data_dir_it_looked_in(filled: Filled, tmp_path: Path) -> None:
    home = tmp_path / "home"  # an empty per-user default: nothing there
    ckpt_dir = tmp_path / "my-ckpts"
    ckpt_dir.mkdir()
    out = cli("ckpt", "ls", "--dir", str(ckpt_dir), env={"HOME": str(home), "XDG_DATA_HOME": str(home / "share")})
    assert out.returncode == 1
    assert str(ckpt_dir / "registry.db") in out.stderr and "--data-dir" in out.stderr, out.stderr
    assert "data directory from the default" in out.stderr
    missing = cli("ckpt", "ls", "--dir", str(tmp_path / "nope"), "--data-dir", str(filled.paths.data_dir))
    # the agent's store has a registry: --dir only narrows it (to nothing here)
    assert missing.returncode == 0 and missing.stdout.startswith("STATE") and len(missing.stdout.splitlines()) == 1


def test_relative_config_paths_follow_the_working_directory(filled: Filled, tmp_path: Path) -> None:
    """A relative agent.data_dir in a config file is relative to the working directory (as for the
    trainer); from elsewhere, the error says so and names the directory it tried."""
    data = filled.paths.data_dir
    cfg = tmp_path / "elsewhere" / "rel.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump({"agent": {"data_dir": data.name}}))
    here = cli("runs", "ls", "--config", str(cfg), cwd=data.parent)
    assert here.returncode == 0 and "exp-run" in here.stdout, here.stderr
    away = cli("runs", "ls", "--config", str(cfg), cwd=tmp_path)
    assert away.returncode == 1
    assert str(tmp_path / data.name / "flightlog.db") in away.stderr
    assert f"relative to the working directory {tmp_path}" in away.stderr, away.stderr


def test_data_dir_beats_the_environment_and_config_does_not(filled: Filled, tmp_path: Path) -> None:
    """Precedence as the trainer has it: --data-dir, then FLIGHTLOG_DATA_DIR, then the config."""
    other = tmp_path / "empty-config.yaml"
    other.write_text(yaml.safe_dump({"agent": {"data_dir": str(tmp_path / "nothing")}}))
    env = {"FLIGHTLOG_DATA_DIR": str(filled.paths.data_dir)}
    assert "exp-run" in cli("runs", "ls", "--config", str(other), env=env).stdout
    bad = cli("runs", "ls", "--data-dir", str(tmp_path / "nothing"), env=env)
    assert bad.returncode == 1 and "from --data-dir" in bad.stderr


def test_wal_inspect_finds_the_wal_of_a_data_dir(filled: Filled, tmp_path: Path) -> None:
    data = filled.paths.data_dir
    direct = json.loads(cli("wal", "inspect", str(data / "wal"), "--json").stdout)
    assert direct["totals"]["events"] > 0
    for args in ([str(data)], ["--data-dir", str(data)], ["--config", str(filled.config)]):
        out = cli("wal", "inspect", *args, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["totals"]["events"] >= direct["totals"]["events"]
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    empty = cli("wal", "inspect", str(tmp_path / "stuff"))
    assert empty.returncode == 1 and "holds no WAL" in empty.stderr and "totals" not in empty.stdout


def test_wal_replay_takes_a_data_dir_or_its_config(filled: Filled, tmp_path: Path) -> None:
    from flightlog.agent.store import Store

    for i, args in enumerate(([str(filled.paths.data_dir)], ["--config", str(filled.config)])):
        db = tmp_path / f"replayed-{i}.db"
        out = cli("wal", "replay", *args, "--to", f"store={db}", "--no-progress", "--state-dir", str(tmp_path / f"s{i}"))
        assert out.returncode == 0, out.stderr
        with Store(db, readonly=True) as store:
            assert {"exp-run", "dup-one", "dup-two", "spoof-run", "tb-run"} <= {r["run_id"] for r in store.runs()}
    assert "holds no WAL" in cli("wal", "replay", str(tmp_path), "--to", f"store={tmp_path / 'x.db'}").stderr


def test_runs_export_json_has_the_points_and_honours_key(filled: Filled) -> None:
    d = ["--data-dir", str(filled.paths.data_dir)]
    doc = json.loads(cli("runs", "export", filled.exp, "--format", "json", *d).stdout)
    assert doc["run_id"] == filled.exp
    assert sorted((p["key"], p["step"]) for p in doc["metrics"] if not p["key"].startswith("system/")) == \
        sorted((k, s) for k in ("acc", "loss") for s in range(5))
    only = json.loads(cli("runs", "export", filled.exp, "--format", "json", "--key", "loss", *d).stdout)
    assert [(p["key"], p["step"], p["value"]) for p in only["metrics"]] == [("loss", s, 1.0 / (s + 1)) for s in range(5)]
    lines = cli("runs", "export", filled.exp, "--key", "acc", *d).stdout.splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["acc"] * 5
    missing = cli("runs", "export", filled.exp, "--format", "json", "--key", "nope", *d)
    assert missing.returncode == 1 and "has no metric 'nope'" in missing.stderr and "'loss'" in missing.stderr


def test_status_json_in_every_state(filled: Filled, tmp_path: Path) -> None:
    up = cli("status", "--json", "--config", str(filled.config))
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["running"] is True
    down = cli("status", "--json", "--data-dir", str(tmp_path), "--socket", str(tmp_path / "none.sock"))
    assert down.returncode == 1
    doc = json.loads(down.stdout)  # JSON, not "agent: not running"
    assert doc["running"] is False and doc["socket"] == str(tmp_path / "none.sock")


def test_an_ambiguous_run_name_is_refused_with_the_matches(filled: Filled) -> None:
    d = ["--data-dir", str(filled.paths.data_dir)]
    for command in (["runs", "export", "dup"], ["plot", "dup"]):
        out = cli(*command, *d)
        assert out.returncode == 1 and out.stdout == ""
        assert "2 runs are named 'dup'" in out.stderr and all(rid in out.stderr for rid in filled.dups), out.stderr
    assert cli("runs", "export", "exp", "--key", "loss", *d).stdout.count("\n") == 5  # a unique name still works
    assert cli("runs", "export", "dup-t", "--key", "loss", *d).returncode == 0  # so does a unique id prefix


# --- item 17: user strings cannot spoof the terminal ------------------------------------------------------

def test_runs_ls_escapes_control_and_bidi_characters(filled: Filled) -> None:
    out = cli("runs", "ls", "--data-dir", str(filled.paths.data_dir))
    assert out.returncode == 0, out.stderr
    assert "\u202e" not in out.stdout and "\x1b" not in out.stdout
    assert not any(line.startswith("fake-run") for line in out.stdout.splitlines())
    assert len(out.stdout.splitlines()) == 1 + 5  # the header and one line per run
    line = next(x for x in out.stdout.splitlines() if x.startswith(filled.spoof))
    assert "spoof\\nfake-run ok\\u202eevil" in line
    listed = json.loads(cli("runs", "ls", "--json", "--data-dir", str(filled.paths.data_dir)).stdout)
    assert SPOOF in [r["name"] for r in listed]  # JSON keeps the name (json escapes it)


def test_printable_escapes_what_repr_escapes() -> None:
    from flightlog.agent.cliutil import printable

    assert printable("plain run 1 é ü 日本") == "plain run 1 é ü 日本"
    assert printable("a\nb\tc\r\x00\x1b\u202e\u2066\u200f\u2028\U000e0001") == \
        "a\\nb\\tc\\r\\x00\\x1b\\u202e\\u2066\\u200f\\u2028\\U000e0001"
    assert all(printable(chr(c)).isprintable() for c in range(0x3000))


# --- item 18: only the sinks runs use; "no agent" said once ------------------------------------------------

def test_status_lists_only_the_sinks_runs_use(filled: Filled) -> None:
    out = cli("status", "--data-dir", str(filled.paths.data_dir), "--socket", str(filled.paths.socket))
    assert out.returncode == 0, out.stderr
    sink_lines = [x.strip() for x in out.stdout.splitlines() if x.startswith("  ") and ": " in x]
    names = {x.split(":")[0] for x in sink_lines if x.split(":")[0] in ("store", "tensorboard", "mlflow", "wandb")}
    assert names == {"store", "tensorboard"}, out.stdout
    assert "(no run uses mlflow, wandb, webhook)" in out.stdout
    doc = json.loads(cli("status", "--json", "--config", str(filled.config)).stdout)
    assert {n for n, s in doc["sinks"].items() if s["in_use"]} == {"store", "tensorboard"}


def test_no_agent_is_said_once(tmp_path: Path) -> None:
    """An agent that cannot start (its lock file is a directory): one warning, not one per attempt (there
    were two at start, from the link and the tracker, and a third at finish)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "agent.lock").mkdir()
    script = (
        "import flightlog\n"
        f"cfg = {{'tracking': {{'use_tensorboard': False}}, 'checkpointing': {{'checkpoint_dir': {str(tmp_path / 'c')!r}}},"
        " 'agent': {'autostart': True, 'connect_timeout_seconds': 20}}\n"
        "t = flightlog.ExperimentTracker('lonely', cfg)\n"
        "t.log_metrics({'loss': 1.0})\n"
        "t.finish()\n"
    )
    sock = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp")) / "a.sock"
    try:
        env = {**os.environ, "FLIGHTLOG_DATA_DIR": str(data), "FLIGHTLOG_AGENT_SOCKET": str(sock)}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        said = [x for x in out.stderr.splitlines() if "no agent" in x or "agent exited" in x]
        assert len(said) == 1, out.stderr
        assert "yet" in said[0] and "exited with code" in said[0]
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)
        shutil.rmtree(resolve_paths(data, sock).ring_dir, ignore_errors=True)
