"""Configuration loading: YAML, flat form, extends, env overrides, error messages and the config hash."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flightlog.proto.config import (
    AgentConfig,
    CheckpointConfig,
    Config,
    MonitoringConfig,
    TrackingConfig,
    WalConfig,
    config_hash,
    config_to_dict,
    load_config,
)
from flightlog.proto.errors import ConfigError

DESIGN_YAML = """\
description: "Transformer fine-tuning experiment"
tags: ["nlp", "transformer", "classification"]
tracking:
  use_wandb: true
  wandb_project: "production-models"
  wandb_entity: "my-team"
  use_tensorboard: true
  tensorboard_log_dir: "logs/tensorboard"
  use_mlflow: true
  mlflow_tracking_uri: "sqlite:///mlflow.db"
checkpointing:
  checkpoint_dir: "checkpoints"
  max_checkpoints: 20
  save_frequency: 100
  compression: "zstd"        # also "gzip" and "none"
monitoring:
  log_gpu_usage: true
  log_memory_usage: true
  create_plots: true
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_design_example_every_key_honoured(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "exp.yaml", DESIGN_YAML), env={})
    assert cfg.description == "Transformer fine-tuning experiment"
    assert cfg.tags == ["nlp", "transformer", "classification"]
    t = cfg.tracking
    assert (t.use_wandb, t.wandb_project, t.wandb_entity) == (True, "production-models", "my-team")
    assert (t.use_tensorboard, t.tensorboard_log_dir) == (True, "logs/tensorboard")
    assert (t.use_mlflow, t.mlflow_tracking_uri) == (True, "sqlite:///mlflow.db")
    c = cfg.checkpointing
    assert (c.checkpoint_dir, c.max_checkpoints, c.save_frequency, c.compression) == ("checkpoints", 20, 100, "zstd")
    m = cfg.monitoring
    assert (m.log_gpu_usage, m.log_memory_usage, m.create_plots) == (True, True, True)


def test_values_differing_from_defaults_are_read(tmp_path: Path) -> None:
    # The DESIGN example mostly repeats defaults; this pins that non-default values really arrive.
    path = write(tmp_path / "c.yaml", """\
        tracking: {use_tensorboard: false, tensorboard_log_dir: tb, mlflow_tracking_uri: "http://x:5000",
                   wandb_mode: offline, wandb_dir: w, mlflow_experiment_name: e}
        checkpointing: {compression: gzip, compression_level: 9, monitor: val_loss, mode: max,
                        keep_every_n_steps: 1000, upload: best, min_free_bytes: 5, max_checkpoints: 0}
        monitoring: {log_gpu_usage: false, interval_seconds: 0.5, plot_every_minutes: 10, all_gpus: true,
                     disk_free_floor_bytes: 0}
        agent: {data_dir: d, socket: /tmp/s, autostart: false, idle_exit_seconds: 1, ring_bytes: 65536,
                on_full: drop, block_timeout_seconds: 0, connect_timeout_seconds: 2}
        wal: {fsync: always, fsync_ms: 5, segment_bytes: 1024, max_bytes: 10}
    """)
    cfg = load_config(path, env={})
    assert cfg.tracking == TrackingConfig(use_tensorboard=False, tensorboard_log_dir="tb",
                                          mlflow_tracking_uri="http://x:5000", wandb_mode="offline",
                                          wandb_dir="w", mlflow_experiment_name="e")
    assert cfg.checkpointing == CheckpointConfig(compression="gzip", compression_level=9, monitor="val_loss",
                                                 mode="max", keep_every_n_steps=1000, upload="best",
                                                 min_free_bytes=5, max_checkpoints=0)
    assert cfg.monitoring == MonitoringConfig(log_gpu_usage=False, interval_seconds=0.5, plot_every_minutes=10.0,
                                              all_gpus=True, disk_free_floor_bytes=0)
    assert cfg.agent == AgentConfig(data_dir="d", socket="/tmp/s", autostart=False, idle_exit_seconds=1.0,
                                    ring_bytes=65536, on_full="drop", block_timeout_seconds=0.0,
                                    connect_timeout_seconds=2.0)
    assert cfg.wal == WalConfig(fsync="always", fsync_ms=5, segment_bytes=1024, max_bytes=10)
    assert cfg.tracking.tensorboard_log_dir == "tb"  # relative paths are left as written


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.description == "" and cfg.tags == []
    assert cfg.tracking.use_tensorboard and not cfg.tracking.use_wandb and not cfg.tracking.use_mlflow
    assert cfg.checkpointing.max_checkpoints == 10 and cfg.checkpointing.compression == "zstd"
    assert cfg.monitoring.interval_seconds == 10.0 and cfg.monitoring.disk_free_floor_bytes == 1 << 30
    assert cfg.agent.ring_bytes == 8 << 20 and cfg.agent.on_full == "spill"
    assert cfg.wal.fsync == "interval" and cfg.wal.fsync_ms == 100 and cfg.wal.segment_bytes == 64 << 20
    assert Config().tags is not Config().tags  # no shared mutable default


def test_empty_file_and_empty_section_are_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "e.yaml", "# nothing yet\n"), env={}) == Config()
    assert load_config(write(tmp_path / "s.yaml", "tracking:\n  # use_mlflow: true\n"), env={}) == Config()


def test_flat_form(tmp_path: Path) -> None:
    path = write(tmp_path / "flat.yaml", """\
        checkpoint_dir: ckpt
        max_checkpoints: 3
        save_frequency: 50
        compression: gzip
        checkpointing: {mode: max}
    """)
    c = load_config(path, env={}).checkpointing
    assert (c.checkpoint_dir, c.max_checkpoints, c.save_frequency, c.compression, c.mode) == (
        "ckpt", 3, 50, "gzip", "max")
    assert load_config({"max_checkpoints": 3, "checkpointing": {"max_checkpoints": 3}}, env={}) \
        .checkpointing.max_checkpoints == 3  # the same value twice is no conflict


def test_flat_form_conflict(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "max_checkpoints: 3\ncheckpointing: {max_checkpoints: 4}\n")
    with pytest.raises(ConfigError, match=r"max_checkpoints") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_extends_two_levels_relative(tmp_path: Path) -> None:
    write(tmp_path / "base" / "root.yaml", """\
        description: root
        tags: [a, b]
        tracking: {use_mlflow: true, wandb_project: rootproj}
        max_checkpoints: 7
    """)
    write(tmp_path / "base" / "mid.yaml", """\
        extends: root.yaml
        tags: [c]
        tracking: {wandb_project: midproj}
        monitoring: {interval_seconds: 2}
    """)
    exp = write(tmp_path / "exps" / "exp.yaml", """\
        extends: ../base/mid.yaml
        description: exp
        checkpointing: {save_frequency: 9}
    """)
    cfg = load_config(exp, env={})
    assert cfg.description == "exp"
    assert cfg.tags == ["c"]  # lists replace
    assert cfg.tracking.use_mlflow is True  # dicts merge
    assert cfg.tracking.wandb_project == "midproj"
    assert cfg.monitoring.interval_seconds == 2.0
    assert (cfg.checkpointing.max_checkpoints, cfg.checkpointing.save_frequency) == (7, 9)


def test_extends_list_later_wins_and_child_overrides_flat_base(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "description: a\ncheckpoint_dir: from_a\n")
    write(tmp_path / "b.yaml", "description: b\n")
    child = write(tmp_path / "c.yaml", "extends: [a.yaml, b.yaml]\ncheckpointing: {checkpoint_dir: from_c}\n")
    cfg = load_config(child, env={})
    assert cfg.description == "b"
    assert cfg.checkpointing.checkpoint_dir == "from_c"  # flat form in a base is no conflict with the child


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: sub/c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "extends: ../a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(tmp_path / "a.yaml", env={})
    msg = str(info.value)
    assert "a.yaml" in msg and "b.yaml" in msg and "c.yaml" in msg


def test_extends_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(write(tmp_path / "a.yaml", "extends: nope.yaml\n"), env={})


def test_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", DESIGN_YAML)
    env = {
        "FLIGHTLOG_TRACKING__USE_MLFLOW": "false",
        "FLIGHTLOG_CHECKPOINTING__MAX_CHECKPOINTS": "5",
        "FLIGHTLOG_TAGS": "[x, y]",
        "FLIGHTLOG_DESCRIPTION": "yes",  # a str field keeps the text, not YAML's True
        "flightlog_monitoring__interval_seconds": "0.25",  # case-insensitive
        "FLIGHTLOG_TRACKING__WANDB_ENTITY": "null",
        "FLIGHTLOG_TRACKING__WANDB_PROJECT": "1234",  # stays a str
        "FLIGHTLOG_CHECKPOINTING__MONITOR": "val: [loss",  # not YAML, but a str field takes it verbatim
        "FLIGHTLOG_WAL": "{fsync: never}",  # a whole section merges over the file's
        "FLIGHTLOG_DATA_DIR": "/elsewhere",  # read by the agent, not a config override
        "FLIGHTLOG_AGENT_SOCKET": "/tmp/sock",
        "OTHER": "1",
    }
    cfg = load_config(path, env=env)
    assert cfg.tracking.use_mlflow is False
    assert cfg.tracking.use_wandb is True  # untouched keys of the file stay
    assert cfg.checkpointing.max_checkpoints == 5
    assert cfg.tags == ["x", "y"]
    assert cfg.description == "yes"
    assert cfg.monitoring.interval_seconds == 0.25
    assert cfg.tracking.wandb_entity is None
    assert cfg.tracking.wandb_project == "1234"
    assert cfg.checkpointing.monitor == "val: [loss"
    assert cfg.wal.fsync == "never" and cfg.wal.fsync_ms == 100
    assert cfg.agent == AgentConfig()


def test_env_overrides_apply_to_defaults_dicts_and_config_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"FLIGHTLOG_AGENT__RING_BYTES": "65536"}
    assert load_config(env=env).agent.ring_bytes == 65536
    assert load_config({"description": "d"}, env=env).agent.ring_bytes == 65536
    base = Config(description="d")
    assert load_config(base, env=env) == Config(description="d", agent=AgentConfig(ring_bytes=65536))
    assert load_config(base, env={}) is base
    monkeypatch.setenv("FLIGHTLOG_WAL__FSYNC_MS", "7")  # default env is os.environ
    assert load_config().wal.fsync_ms == 7


@pytest.mark.parametrize("var", ["FLIGHTLOG_TRACKING__USE_MLFLOWW", "FLIGHTLOG_NOPE__X",
                                 "FLIGHTLOG_DESCRIPTION__X", "FLIGHTLOG_TRACKING__"])
def test_env_unknown_key_names_variable(var: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={var: "1"})
    assert var in str(info.value)


def test_env_value_not_yaml_names_variable() -> None:
    with pytest.raises(ConfigError, match="FLIGHTLOG_TAGS"):
        load_config(env={"FLIGHTLOG_TAGS": "[a, b"})


def test_env_bad_value_names_variable_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", DESIGN_YAML)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"FLIGHTLOG_TRACKING__USE_MLFLOW": "maybe"})
    msg = str(info.value)
    assert "FLIGHTLOG_TRACKING__USE_MLFLOW" in msg and "tracking.use_mlflow" in msg and "bool" in msg


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "tracking:\n  use_mlfow: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert "tracking.use_mlfow" in msg and str(path) in msg and "unknown key" in msg
    assert "use_mlflow" in msg  # the valid keys are listed, so the typo is easy to spot

    # A top-level key of the user's own is the experiment's config (issue "Where users already train"), but
    # one that looks like a misspelt flightlog key is still refused, naming the key it resembles.
    assert load_config(write(tmp_path / "top.yaml", "colour: red\n"), env={}).experiment == {"colour": "red"}
    with pytest.raises(ConfigError, match=r"`monitorng`.*did you mean flightlog's `monitoring`") as info:
        load_config(write(tmp_path / "typo.yaml", "monitorng: {interval_seconds: 1}\n"), env={})
    assert str(tmp_path / "typo.yaml") in str(info.value)


@pytest.mark.parametrize(
    ("yaml_text", "key", "words"),
    [
        ("tracking: {use_mlflow: sometimes}\n", "tracking.use_mlflow", ["bool", "str"]),
        ("checkpointing: {max_checkpoints: -1}\n", "checkpointing.max_checkpoints", [">= 0"]),
        ("checkpointing: {compression: lz4}\n", "checkpointing.compression", ["lz4"]),
        ("monitoring: {interval_seconds: 0}\n", "monitoring.interval_seconds", ["> 0"]),
        ("wal: {fsync_ms: 0}\n", "wal.fsync_ms", [">= 1"]),
        ("tags: [1]\n", "tags[0]", ["str", "int"]),
        ("tracking: 3\n", "tracking", ["object"]),
        ("checkpointing: 3\nmax_checkpoints: 2\n", "checkpointing", ["object"]),
        ("agent: {ring_bytes: 100000}\n", "agent.ring_bytes", ["power of two"]),
        ("agent: {ring_bytes: 32768}\n", "agent.ring_bytes", ["power of two"]),
        ("agent: {ring_bytes: 2147483648}\n", "agent.ring_bytes", ["power of two"]),
    ],
)
def test_wrong_value_names_key_and_file(tmp_path: Path, yaml_text: str, key: str, words: list[str]) -> None:
    path = write(tmp_path / "exp.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert f"`{key}`" in msg and str(path) in msg
    for word in words:
        assert word in msg


def test_error_names_the_base_file_the_value_came_from(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "tracking: {use_mlflow: sometimes}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ndescription: c\n")
    with pytest.raises(ConfigError) as info:
        load_config(child, env={})
    assert str(base) in str(info.value)


def test_dict_source_errors_say_dict() -> None:
    with pytest.raises(ConfigError, match=r"dict.*`wal\.fsync`"):
        load_config({"wal": {"fsync": "sometimes"}}, env={})


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", "description: ok\ntracking:\n  use_mlflow: [true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert str(path) in msg and "line" in msg


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_config_to_dict_round_trip() -> None:
    cfg = Config(description="d", tags=["t"], tracking=TrackingConfig(use_mlflow=True))
    data = config_to_dict(cfg)
    assert data["tracking"]["use_mlflow"] is True and data["tags"] == ["t"]
    assert load_config(data, env={}) == cfg


# --- config_hash ---------------------------------------------------------------------------------------


def test_hash_stable_across_formatting_and_key_order(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", DESIGN_YAML)
    b = write(tmp_path / "b.yaml", """\
        monitoring: {create_plots: yes, log_memory_usage: true, log_gpu_usage: True}
        checkpointing:
            compression: zstd
            save_frequency: 100
            max_checkpoints: 20
            checkpoint_dir: 'checkpoints'
        tracking:
            mlflow_tracking_uri: sqlite:///mlflow.db
            use_mlflow: true
            tensorboard_log_dir: logs/tensorboard
            use_tensorboard: true
            wandb_entity: my-team
            wandb_project: production-models
            use_wandb: true
        tags:
          - nlp
          - transformer
          - classification
        description: Transformer fine-tuning experiment
    """)
    h = config_hash(a)
    assert len(h) == 64 and int(h, 16) >= 0
    assert config_hash(b) == h
    assert config_hash(str(a)) == h
    assert config_hash(load_config(a, env={})) == h
    flat = DESIGN_YAML.replace("checkpointing:\n", "").replace("\n  checkpoint_dir", "\ncheckpoint_dir")
    for key in ("max_checkpoints", "save_frequency", "compression"):
        flat = flat.replace(f"\n  {key}", f"\n{key}")
    assert "\ncompression:" in flat
    assert config_hash(write(tmp_path / "flat.yaml", flat)) == h


def test_hash_ignores_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.yaml", DESIGN_YAML)
    h = config_hash(path)
    monkeypatch.setenv("FLIGHTLOG_TRACKING__USE_MLFLOW", "false")
    assert config_hash(path) == h


def test_hash_normalises_int_for_float() -> None:
    assert config_hash(Config(monitoring=MonitoringConfig(interval_seconds=10))) == config_hash(Config())


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        (None, "description", "other"),
        (None, "tags", ["nlp", "transformer"]),
        (None, "tags", ["transformer", "nlp", "classification"]),  # list order is part of the identity
        ("tracking", "use_wandb", False),
        ("tracking", "wandb_entity", None),
        ("tracking", "tensorboard_log_dir", "logs/tb"),
        ("checkpointing", "max_checkpoints", 21),
        ("checkpointing", "compression", "gzip"),
        ("monitoring", "create_plots", False),
        ("monitoring", "interval_seconds", 5.5),
        ("wal", "fsync", "always"),
    ],
)
def test_hash_changes_with_any_value(tmp_path: Path, section: str | None, key: str, value: Any) -> None:
    import yaml

    base = yaml.safe_load(DESIGN_YAML)
    changed = yaml.safe_load(DESIGN_YAML)
    (changed.setdefault(section, {}) if section else changed)[key] = value
    assert config_hash(base) != config_hash(changed)


@pytest.mark.parametrize(
    "agent", [{"socket": "/run/a.sock"}, {"data_dir": "/scratch/x"}, {"ring_bytes": 65536, "autostart": False}]
)
def test_hash_excludes_agent_section(agent: dict[str, Any]) -> None:
    import yaml

    base = yaml.safe_load(DESIGN_YAML)
    assert config_hash({**base, "agent": agent}) == config_hash(base)



@settings(max_examples=50, deadline=None)
@given(order=st.permutations(["description", "tags", "tracking", "checkpointing", "monitoring"]),
       inner=st.randoms(use_true_random=False))
def test_hash_independent_of_dict_order(order: list[str], inner: Any) -> None:
    import yaml

    base = yaml.safe_load(DESIGN_YAML)
    shuffled: dict[str, Any] = {}
    for key in order:
        value = base[key]
        if isinstance(value, dict):
            items = list(value.items())
            inner.shuffle(items)
            value = dict(items)
        shuffled[key] = value
    assert config_hash(shuffled) == config_hash(base)


def test_import_does_not_load_yaml() -> None:
    # `import flightlog` must stay fast: yaml is imported only when a file or override is read.
    code = "import sys, flightlog.config; assert 'yaml' not in sys.modules, 'yaml imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
