"""Full experiment configs (issue "Where users already train", item 4): the user's own sections next to
flightlog's are kept as the run's config and hyper-parameters, flightlog's sections stay strict, and the
config hash covers the whole experiment and every logged hyper-parameter."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import AgentProcess

import flightlog
from flightlog.agent.store import Store
from flightlog.proto.config import config_hash, decode_config, load_config
from flightlog.proto.errors import ConfigError
from flightlog.proto.paths import AgentPaths

EXPERIMENT = """\
description: resnet on cifar
model:
  name: resnet18
  layers: [2, 2, 2, 2]
training:
  lr: 0.1
  epochs: 90
  optimizer: {name: sgd, momentum: 0.9}
data: {path: /data/cifar, batch_size: 128}
tracking:
  use_tensorboard: false
checkpointing:
  max_checkpoints: 3
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_user_sections_are_kept_and_flightlog_sections_stay_strict(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "exp.yaml", EXPERIMENT), env={})
    assert cfg.experiment == {
        "model": {"name": "resnet18", "layers": [2, 2, 2, 2]},
        "training": {"lr": 0.1, "epochs": 90, "optimizer": {"name": "sgd", "momentum": 0.9}},
        "data": {"path": "/data/cifar", "batch_size": 128},
    }
    assert cfg.checkpointing.max_checkpoints == 3 and cfg.tracking.use_tensorboard is False
    # flightlog's own sections are as strict as before: a typo inside one is an error naming it
    with pytest.raises(ConfigError, match=r"tracking\.use_tensorbord.*unknown key"):
        load_config(write(tmp_path / "bad.yaml", EXPERIMENT.replace("use_tensorboard", "use_tensorbord")), env={})
    # ... and a misspelt section name is not taken for the user's
    with pytest.raises(ConfigError, match=r"`checkpoints`.*did you mean flightlog's `(max_checkpoints|checkpointing)`"):
        load_config(write(tmp_path / "typo.yaml", "checkpoints: {max_checkpoints: 3}\n"), env={})
    # a section of the user's that happens to look like flightlog's goes under experiment:
    cfg = load_config({"experiment": {"trackers": ["a"]}, "model": {"x": 1}}, env={})
    assert cfg.experiment == {"trackers": ["a"], "model": {"x": 1}}


def test_extends_merges_user_sections(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", EXPERIMENT)
    cfg = load_config(write(tmp_path / "lr.yaml", "extends: base.yaml\ntraining: {lr: 0.05}\n"), env={})
    assert cfg.experiment["training"] == {"lr": 0.05, "epochs": 90, "optimizer": {"name": "sgd", "momentum": 0.9}}
    assert cfg.experiment["model"]["name"] == "resnet18"


def test_the_hash_covers_the_experiment_and_logged_hyperparameters(tmp_path: Path) -> None:
    base = load_config(write(tmp_path / "a.yaml", EXPERIMENT), env={})
    reordered = "\n".join([*EXPERIMENT.splitlines()[9:], *EXPERIMENT.splitlines()[:9]]) + "\n"  # sections moved
    same = load_config(write(tmp_path / "b.yaml", reordered), env={})
    other_lr = load_config(write(tmp_path / "c.yaml", EXPERIMENT.replace("lr: 0.1", "lr: 0.01")), env={})
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other_lr)  # differ only in learning rate: differ in hash
    assert config_hash(base, {"seed": 1}) != config_hash(base, {"seed": 2}) != config_hash(base)
    assert config_hash(base, {}) == config_hash(base)
    # the node-local agent section stays out of it, as before
    moved = load_config({**load_config(tmp_path / "a.yaml", env={}).experiment, "agent": {"ring_bytes": 1 << 20},
                         "description": "resnet on cifar", "tracking": {"use_tensorboard": False},
                         "checkpointing": {"max_checkpoints": 3}}, env={})
    assert config_hash(moved) == config_hash(base)


def test_the_agent_decodes_a_run_config_with_user_sections() -> None:
    cfg, problems = decode_config({"experiment": {"model": {"depth": 3}}, "tracking": {"use_mlflow": False}})
    assert problems == [] and cfg.experiment == {"model": {"depth": 3}}


def test_a_run_logs_its_sections_as_hyperparameters_and_its_hash_follows_them(
        agent: AgentProcess, agent_paths: AgentPaths, tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", EXPERIMENT + f"agent: {{autostart: false}}\ncheckpoint_dir: {tmp_path}/c\n")
    with flightlog.experiment_tracking("cifar", path) as t:
        start_hash = t.metadata.config_hash
        assert start_hash == config_hash(load_config(path, env={}))
        t.log_hyperparameters({"seed": 7})
        run_id, final_hash = t.run_id, t.metadata.config_hash
    assert final_hash == config_hash(load_config(path, env={}), {"seed": 7}) != start_hash
    deadline = time.monotonic() + 60
    while True:
        with Store(agent_paths.store, readonly=True) as store:
            run = store.run(run_id) if run_id in {r["run_id"] for r in store.runs()} else None
        if run and run["status"] == "completed":
            break
        assert time.monotonic() < deadline, "run never completed in the store"
        time.sleep(0.2)
    assert run["params"]["training"] == {"lr": 0.1, "epochs": 90, "optimizer": {"name": "sgd", "momentum": 0.9}}
    assert run["params"]["seed"] == 7 and run["config_hash"] == final_hash
