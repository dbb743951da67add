"""What the tracker refuses at the call, before anything reaches a ring: run ids that cannot name files,
steps outside 64 bits, keys MLflow would refuse when it is on for the run."""
from __future__ import annotations

import os
import time

import msgspec
import pytest
from conftest import AgentProcess
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pipeline import wait_points

import flightlog
from flightlog.metrics import _TAG
from flightlog.proto.codec import event_encoder
from flightlog.proto.events import Metrics
from flightlog.proto.paths import AgentPaths
from flightlog.validate import INT64_MAX, INT64_MIN, MLFLOW_KEY_MAX, check_run_id, mlflow_key_problem


def _rings(paths: AgentPaths) -> list[str]:
    return os.listdir(paths.ring_dir) if paths.ring_dir.exists() else []


def test_a_run_id_of_300_characters_is_a_clear_value_error(agent_paths: AgentPaths, base_config: dict) -> None:
    with pytest.raises(ValueError, match=r"run_id .*300 characters.*1 to 128 characters"):
        flightlog.ExperimentTracker("long", base_config, run_id="r" * 300)
    for bad in ("../escape", "a/b", ".hidden", "with space", "x\0y"):
        with pytest.raises(ValueError, match="run_id"):
            flightlog.ExperimentTracker("bad", base_config, run_id=bad)
    assert _rings(agent_paths) == []  # refused before any file was made


def test_a_run_id_of_128_characters_works(agent: AgentProcess, base_config: dict) -> None:
    run_id = "r" * 128
    with flightlog.ExperimentTracker("long-ok", base_config, run_id=run_id) as t:
        t.log_metrics({"x": 1.0}, step=0)
    assert len(wait_points(agent.paths, run_id, 1)) == 1


def test_check_run_id_rule() -> None:
    assert check_run_id("exp-1_lr0.1") == "exp-1_lr0.1"
    with pytest.raises(TypeError):
        check_run_id(5)


def test_steps_outside_int64_are_refused_at_the_call(agent_paths: AgentPaths, base_config: dict) -> None:
    t = flightlog.ExperimentTracker("steps", base_config)
    try:
        with pytest.raises(ValueError, match=r"step 9223372036854775808 is outside the signed 64-bit range"):
            t.log_metrics({"m": 1.0}, step=2**63)
        with pytest.raises(ValueError, match="64-bit"):
            t.log_metrics({"m": 1.0}, step=INT64_MIN - 1)
        with pytest.raises(ValueError, match="64-bit"):
            t.log_text("k", "v", step=2**64)
        t.log_metrics({"m": 1.0}, step=INT64_MAX)  # the largest is fine
        with pytest.raises(ValueError, match="64-bit"):
            t.log_metrics({"m": 1.0})  # previous + 1 would overflow
        assert t._step == INT64_MAX
        t.log_metrics({"big": 2**70}, step=INT64_MAX)  # an int value beyond 64 bits goes as a float
        with pytest.raises(TypeError, match="step must be an int"):
            t.log_metrics({"m": 1.0}, step="3")
    finally:
        t.finish()


def test_mlflow_key_rule_at_the_call(agent_paths: AgentPaths, base_config: dict, tmp_path: object) -> None:
    cfg = {**base_config, "tracking": {**base_config["tracking"], "use_mlflow": True,
                                       "mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    t = flightlog.ExperimentTracker("mlflow-keys", cfg)
    try:
        with pytest.raises(ValueError, match=r"metric key 'acc@top1' cannot go to MLflow.*contains '@'.*rename it"):
            t.log_metrics({"loss": 1.0, "acc@top1": 0.5}, step=0)
        with pytest.raises(ValueError, match=r"'\.\./x'.*as a path"):
            t.log_metrics({"../x": 1.0}, step=0)
        with pytest.raises(ValueError, match=f"{MLFLOW_KEY_MAX + 1} characters"):
            t.log_metrics({"k" * (MLFLOW_KEY_MAX + 1): 1.0}, step=0)
        with pytest.raises(ValueError, match="hyper-parameter key 'opt.b@d'"):
            t.log_hyperparameters({"opt": {"b@d": 1}})
        with pytest.raises(ValueError, match="tag key"):
            t.set_tags({"a#b": "x"})
        for ok in ("acc/top1", "val loss", "memory/cuda:0/bytes", "lr-0.1_x", "ünïcode"):
            t.log_metrics({ok: 1.0}, step=1)
        t.log_metrics({"acc/top1": 1.0}, step=2)  # known now: the hot path does not check it again
    finally:
        t.finish()


def test_without_mlflow_any_str_key_goes(agent_paths: AgentPaths, base_config: dict) -> None:
    t = flightlog.ExperimentTracker("no-mlflow", base_config)
    try:
        t.log_metrics({"acc@top1": 0.5}, step=0)
        t.log_hyperparameters({"b@d": 1})
    finally:
        t.finish()


@pytest.mark.parametrize("key,problem", [("ok", ""), ("a@b", "'@'"), ("a//b", "path"), ("/a", "path"),
                                         ("a/", "path"), ("", "path"), ("a b:c/d-e.f_g", "")])
def test_mlflow_key_problem(key: str, problem: str) -> None:
    got = mlflow_key_problem(key)
    assert (problem in got and got) if problem else got == ""


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(INT64_MIN, INT64_MAX), st.floats(allow_nan=False),
       st.dictionaries(st.text(max_size=20), st.floats(allow_nan=False) | st.integers(INT64_MIN, INT64_MAX),
                       max_size=8))
def test_the_hot_path_tuple_is_the_metrics_event(run_id: str, step: int, ts: float, values: dict) -> None:
    """log_metrics encodes a tuple; on the wire it must be exactly the Metrics Struct (a rank's point: with
    its rank; rank 0's: without the appended field, which decodes to its default, 0)."""
    ranked = event_encoder.encode((_TAG, run_id, step, ts, values, 3))
    assert ranked == event_encoder.encode(Metrics(run_id, step, ts, values, 3))
    raw = event_encoder.encode((_TAG, run_id, step, ts, values))
    assert raw == event_encoder.encode((_TAG, run_id, step, ts, values, 3))[:-1].replace(b"\x96", b"\x95", 1)
    decoded = msgspec.msgpack.decode(raw, type=Metrics)
    assert decoded == Metrics(run_id, step, ts, {k: float(v) for k, v in values.items()}, 0)


def test_values_table_of_the_readme(agent: AgentProcess, base_config: dict) -> None:
    """bool and ints beyond 64 bits become floats; steps may go backwards (recorded as given)."""
    with flightlog.ExperimentTracker("table", base_config) as t:
        t.log_metrics({"b": True, "big": 2**70}, step=5)
        t.log_metrics({"b": False, "big": 1}, step=3)
        run_id = t.run_id
    time.sleep(0.1)
    points = {(p["key"], p["step"]): p["value"] for p in wait_points(agent.paths, run_id, 4)}
    assert points == {("b", 5): 1.0, ("big", 5): float(2**70), ("b", 3): 0.0, ("big", 3): 1.0}


def test_steps_out_of_range_are_one_value_error_on_every_path(agent_paths: AgentPaths, base_config: dict) -> None:
    """2**64, -2**63-1 and 2**63 give the README's ValueError (never OverflowError) from the owner thread,
    from another thread (the side channel), from log_text and from the helpers that take a step."""
    import threading

    t = flightlog.ExperimentTracker("steps-paths", base_config)
    errors: list[BaseException] = []
    bad = (2**64, INT64_MIN - 1, 2**63)
    try:
        for step in bad:
            with pytest.raises(ValueError, match="signed 64-bit range") as info:
                t.log_metrics({"m": 1.0}, step=step)
            assert not isinstance(info.value, OverflowError)
            with pytest.raises(ValueError, match="signed 64-bit range"):
                t.log_text("k", "v", step=step)
            with pytest.raises(ValueError, match="signed 64-bit range"):
                t._at(step)  # the step of log_gradient_flow, log_histograms, log_data_distribution

        def other() -> None:
            for step in bad:
                try:
                    t.log_metrics({"m": 1.0}, step=step)
                except BaseException as exc:  # collected for the assertion below
                    errors.append(exc)

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert [type(e) for e in errors] == [ValueError] * 3, errors
        assert t._step == -1  # nothing refused moved the step
    finally:
        t.finish()


def test_an_empty_metric_key_is_refused_at_the_call(agent: AgentProcess, base_config: dict) -> None:
    with flightlog.ExperimentTracker("empty-key", base_config) as t:
        with pytest.raises(ValueError, match="metric key '' is empty"):
            t.log_metrics({"": 1.0})
        with pytest.raises(ValueError, match="metric key '' is empty"):
            t.log_metrics({"ok": 1.0, "": 2.0}, step=0)
        with pytest.raises(ValueError, match="empty"):
            t.log_text("", "text")
        with pytest.raises(ValueError, match="tag key '' is empty"):
            t.set_tags({"": "x"})
        t.log_metrics({"ok": 1.0}, step=1)
        run_id = t.run_id
    assert {(p["key"], p["step"]) for p in wait_points(agent.paths, run_id, 1)} == {("ok", 1)}
