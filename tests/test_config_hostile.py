"""Hostile configuration: files, ``extends`` graphs and environment variables are loaded in bounded time and
memory, and anything wrong is a ConfigError (Hardening issue, item 10; item 18's enum message)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.proto.config import MAX_CONFIG_BYTES, Config, load_config
from flightlog.proto.errors import ConfigError

# A child process under a 1 GiB address-space limit: an unbounded load ends there (MemoryError, a traceback)
# or in the timeout, instead of taking the test machine down with it.
CHILD = """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from flightlog.proto.config import load_config
    from flightlog.proto.errors import ConfigError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    try:
        load_config(sys.argv[1] if sys.argv[1] != "-" else None, env=json.loads(sys.stdin.read()))
        out = "ok"
    except ConfigError as exc:
        out = "ConfigError: " + str(exc)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"out": out, "seconds": time.monotonic() - t0, "grown_kib": grown}))
"""


def load_in_child(path: Path | str, env: dict[str, str] | None = None) -> str:
    """What ``load_config`` gives in a bounded child: "ok" or "ConfigError: ..."; asserts the bounds."""
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(path)], input=json.dumps(env or {}),
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_config({path}) still running after 30 s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert res["seconds"] < 5.0, res
    assert res["grown_kib"] < 64 << 10, res  # < 64 MiB above the interpreter's own
    return str(res["out"])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def billion_laughs(tmp: Path) -> Path:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 10)}]")
    return write(tmp / "laughs.yaml", "\n".join(lines) + "\ntags: *i\n")  # 10**9 strings once expanded


def extends_zero(tmp: Path) -> Path:
    return write(tmp / "zero.yaml", "extends: /dev/zero\n")


def extends_urandom(tmp: Path) -> Path:
    return write(tmp / "urandom.yaml", "extends: /dev/urandom\n")


def extends_fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo.yaml")  # nobody ever writes: open() for reading would wait forever
    return write(tmp / "main.yaml", "extends: fifo.yaml\n")


def nested_5000_flow(tmp: Path) -> Path:
    return write(tmp / "deep.yaml", "tags: " + "[" * 5000 + "]" * 5000 + "\n")


def nested_5000_block(tmp: Path) -> Path:
    return write(tmp / "deep.yaml", "tags:\n  " + "- " * 5000 + "x\n")


def self_referential_anchor(tmp: Path) -> Path:
    return write(tmp / "self.yaml", "tags: &a [*a]\n")


def merge_key_chain(tmp: Path) -> Path:
    # each mapping merges the previous one: a chain of 2,000 `<<` (recursion in the YAML constructor)
    lines = ["m0: &m0 {k: 1}"] + [f"m{i}: &m{i} {{<<: *m{i - 1}}}" for i in range(1, 2000)]
    return write(tmp / "merge.yaml", "\n".join(lines) + "\n")


def too_big_comment_only(tmp: Path) -> Path:
    line = "#" + "c" * 1023 + "\n"
    return write(tmp / "big.yaml", line * (2 * MAX_CONFIG_BYTES // len(line)))  # 2 MiB of comments


#: Deep nesting: flightlog's own check (32 levels), or — PyYAML 6.0.4's libyaml, before flightlog sees the
#: events — the parser's limit of 1,000 levels; a ConfigError naming the file either way. "|" separates
#: the accepted wordings.
NESTED = "nested more than 32 levels|exceeded maximum nesting depth"


def says(out: str, words: str) -> bool:
    return any(w in out for w in words.split("|"))


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "billion-laughs": (billion_laughs, "aliases are expanded"),
    "extends-dev-zero": (extends_zero, "/dev/zero is not a regular file"),
    "extends-dev-urandom": (extends_urandom, "/dev/urandom is not a regular file"),
    "extends-fifo": (extends_fifo, "fifo.yaml is not a regular file"),
    "nested-5000-flow": (nested_5000_flow, NESTED),
    "nested-5000-block": (nested_5000_block, NESTED),
    "self-referential-anchor": (self_referential_anchor, "an anchor that contains itself"),
    "merge-key-chain": (merge_key_chain, "nested more than 32 levels"),
    "200MB-comment-only (2 MiB here)": (too_big_comment_only, "larger than 1048576 bytes (1 MiB), the limit"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_is_a_config_error_in_bounded_time_and_memory(tmp_path: Path, case: str) -> None:
    make, words = HOSTILE[case]
    path = make(tmp_path)
    out = load_in_child(path)
    assert out.startswith("ConfigError: ") and says(out, words), out


def test_diamond_of_extends_loads_each_file_once(tmp_path: Path) -> None:
    levels, width = 8, 6  # 6**8 paths from the top to the leaves: read once each, 49 files
    for level in range(levels):
        for i in range(width):
            if level == levels - 1:
                write(tmp_path / f"l{level}_{i}.yaml", f"description: leaf {i}\n")
            else:
                bases = ", ".join(f"l{level + 1}_{k}.yaml" for k in range(width))
                write(tmp_path / f"l{level}_{i}.yaml", f"extends: [{bases}]\ntags: [l{level}_{i}]\n")
    top = write(tmp_path / "top.yaml", f"extends: [{', '.join(f'l0_{k}.yaml' for k in range(width))}]\n")
    assert load_in_child(top) == "ok"
    cfg = load_config(top, env={})
    assert cfg.description == "leaf 5" and cfg.tags == ["l0_5"]  # later bases win, as for any extends list


def test_extends_graph_has_a_file_limit(tmp_path: Path) -> None:
    for i in range(100):  # a chain of 100 files
        write(tmp_path / f"c{i}.yaml", f"extends: c{i + 1}.yaml\n" if i < 99 else "description: end\n")
    out = load_in_child(tmp_path / "c0.yaml")
    assert out.startswith("ConfigError: ") and "flatten the config files" in out, out


def test_a_file_at_the_size_limit_still_loads(tmp_path: Path) -> None:
    line = "#" + "c" * 1023 + "\n"
    path = write(tmp_path / "max.yaml", "description: fits\n" + line * (MAX_CONFIG_BYTES // len(line) - 1))
    assert path.stat().st_size <= MAX_CONFIG_BYTES
    assert load_in_child(path) == "ok"


@pytest.mark.parametrize(("env", "words"), [
    ({"FLIGHTLOG_TAGS": "&a [*a]"}, "an anchor that contains itself"),
    ({"FLIGHTLOG_TAGS": "[" * 5000 + "]" * 5000}, NESTED),
    ({"FLIGHTLOG_TRACKING": "&a {x: *a}"}, "an anchor that contains itself"),
    ({"FLIGHTLOG_TAGS": "[" + ", ".join(["x"] * 70000) + "]"}, "more than the 65536 allowed"),
    ({"FLIGHTLOG_WAL__FSYNC_MS": "99999999999999999999999"}, "`wal.fsync_ms`: expected `int` <= "),
    ({"FLIGHTLOG_WAL__SEGMENT_BYTES": str(2**64)}, "`wal.segment_bytes`: expected `int` <= "),
    ({"FLIGHTLOG_AGENT__IDLE_EXIT_SECONDS": "1.0e+300"}, "`agent.idle_exit_seconds`: expected `float` <= "),
    ({"FLIGHTLOG_MONITORING__INTERVAL_SECONDS": ".inf"}, "`monitoring.interval_seconds`: expected `float` <= "),
])
def test_hostile_environment_value_is_a_config_error(env: dict[str, str], words: str) -> None:
    out = load_in_child("-", env)
    assert out.startswith("ConfigError: ") and says(out, words) and next(iter(env)) in out, out


def test_a_self_referential_dict_is_a_config_error() -> None:
    d: dict[str, Any] = {"tracking": {}}
    d["tracking"]["x"] = d
    with pytest.raises(ConfigError, match="contains itself"):
        load_config(d, env={})


def test_invalid_enum_value_lists_the_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "checkpointing:\n  compression: lz4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "invalid enum value 'lz4'; use one of 'zstd', 'gzip', 'none', 'zstd-bytegroup'" in str(info.value)
    with pytest.raises(ConfigError, match="use one of 'online', 'offline', 'disabled'"):
        load_config(None, env={"FLIGHTLOG_TRACKING__WANDB_MODE": "sometimes"})


def test_non_utf8_and_bad_dates_are_config_errors(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"description: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1, env={})
    with pytest.raises(ConfigError, match="day is out of range"):
        load_config(write(tmp_path / "date.yaml", "description: 2001-02-30\n"), env={})


# --- fuzzing: any bytes, mutations of a real config, any environment value ------------------------------

EXAMPLE = """\
description: "Transformer fine-tuning experiment"
tags: ["nlp", "transformer", &t "classification"]
tracking: &tr
  use_wandb: true
  wandb_project: "production-models"
  use_tensorboard: true
  tensorboard_log_dir: "logs/tensorboard"
checkpointing:
  checkpoint_dir: "checkpoints"
  max_checkpoints: 20
  compression: "zstd"
monitoring: {log_gpu_usage: true, interval_seconds: 2.5}
wal: {fsync_ms: 100}
"""
YAML_BITS = ["&a ", "*a", "&b ", "*b", "[", "]", "{", "}", ": ", "- ", "<<: ", "!!binary ", "!!set ", "? ", "|\n",
             ">\n", "'", '"', "#", "\n", "  ", ",", "extends: ", "/dev/zero", "2001-02-30", "1e999", "~", "\t",
             "\\ud800", "\x00", "\u202e", "[*a, *a, *a, *a]", "&c [*c]"]


def _bounded_load(load: Callable[[], Config]) -> None:
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        load()
    except ConfigError:
        pass
    finally:
        elapsed = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 5.0 and peak < 64 << 20, (elapsed, peak)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(YAML_BITS) | st.text(max_size=8), max_size=60).map("".join),
    st.tuples(st.integers(0, len(EXAMPLE)), st.integers(0, 40), st.lists(st.sampled_from(YAML_BITS), max_size=6))
    .map(lambda m: EXAMPLE[: m[0]] + "".join(m[2]) + EXAMPLE[m[0] + m[1] :]),
))
def test_fuzzed_yaml_file_loads_or_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _bounded_load(lambda: load_config(path, env={}))


ENV_KEYS = ["FLIGHTLOG_TAGS", "FLIGHTLOG_DESCRIPTION", "FLIGHTLOG_TRACKING", "FLIGHTLOG_WAL__FSYNC_MS",
            "FLIGHTLOG_WAL__FSYNC", "FLIGHTLOG_AGENT__RING_BYTES", "FLIGHTLOG_MONITORING__INTERVAL_SECONDS",
            "FLIGHTLOG_CHECKPOINTING__COMPRESSION", "FLIGHTLOG_CHECKPOINTING", "FLIGHTLOG_TRACKING__WANDB_ENTITY",
            "FLIGHTLOG_AGENT__LINGER_MS", "FLIGHTLOG_NOPE__X", "FLIGHTLOG_WAL__FSYNC_MS__X"]


@settings(max_examples=200, deadline=None)
@given(env=st.dictionaries(
    st.sampled_from(ENV_KEYS),
    st.one_of(st.text(max_size=60), st.lists(st.sampled_from(YAML_BITS), max_size=30).map("".join),
              st.integers(-(2**80), 2**80).map(str), st.floats().map(repr)),
    max_size=3,
))
def test_fuzzed_environment_loads_or_is_a_config_error(env: dict[str, str]) -> None:
    env = {k: v.replace("\x00", "") for k, v in env.items()}  # an environment cannot hold NUL
    _bounded_load(lambda: load_config(None, env=env))
