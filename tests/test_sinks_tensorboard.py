"""TensorBoard sink: event files read back with TensorBoard's own EventAccumulator; exactly once across
re-sends, a crash between write and commit, and `wal replay`."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest_backends import drive, run_events, tb_accumulator, tb_scalars, write_wal
from hypothesis import given, settings
from hypothesis import strategies as st

from flightlog.agent.sinks import Batch, SinkCursor, TensorBoardTracker
from flightlog.agent.sinks.tensorboard_sink import STATE_FILE, ScalarEventEncoder, crc32c_many
from flightlog.proto.events import Metrics

KEYS = ["loss", "acc", "lr/group0"]


def assert_every_scalar_once(run_dir: Path, steps: int, keys: list[str] = KEYS) -> None:
    scalars = tb_scalars(run_dir)
    assert sorted(scalars) == sorted(keys)
    for i, k in enumerate(keys):
        counts = Counter(step for step, _ in scalars[k])
        assert sorted(counts) == list(range(steps)), f"{k}: steps missing"
        assert max(counts.values()) == 1, f"{k}: duplicated steps {[s for s, c in counts.items() if c > 1][:5]}"
        assert all(v == float(s * 10 + i) for s, v in scalars[k])


@given(st.lists(st.binary(max_size=300), max_size=20))
@settings(max_examples=60, deadline=None)
def test_crc32c_matches_tensorboardx(chunks: list[bytes]) -> None:
    from tensorboardX.crc32c import crc32c

    assert crc32c_many(chunks) == [crc32c(c) for c in chunks]


@given(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, width=64),
       st.dictionaries(st.text(min_size=1, max_size=30), st.floats(width=32), max_size=8))
@settings(max_examples=100, deadline=None)
def test_scalar_encoding_parses_as_tensorboard_event(step: int, wall: float, values: dict[str, float]) -> None:
    from tensorboard.compat.proto.event_pb2 import Event

    ev = Event()
    ev.ParseFromString(ScalarEventEncoder().encode(wall, step, values))
    assert ev.step == step and ev.wall_time == wall
    got = {v.tag: v.simple_value for v in ev.summary.value}
    assert list(got) == list(values)
    for k, v in values.items():
        assert got[k] == v or (got[k] != got[k] and v != v)


def test_huge_values_saturate_not_fail() -> None:
    from tensorboard.compat.proto.event_pb2 import Event

    ev = Event()
    ev.ParseFromString(ScalarEventEncoder().encode(0.0, 1, {"big": 1e300, "neg": -1e300, "int": 10**40}))
    assert [v.simple_value for v in ev.summary.value] == [float("inf"), float("-inf"), float("inf")]


def test_run_reaches_tensorboard_exactly_once(tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    evs = run_events("run-a", "exp/one", {"tensorboard_log_dir": str(tb)}, steps=700, keys=KEYS,
                     sinks=["store", "tensorboard"])
    other = run_events("run-b", "not-for-tb", {"tensorboard_log_dir": str(tb)}, steps=5, keys=KEYS,
                       sinks=["store"])
    write_wal(tmp_path / "wal", [e for pair in zip(evs, other) for e in pair] + evs[len(other):], per_record=97)
    [runner] = drive([TensorBoardTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok"
    dirs = sorted(p.name for p in tb.iterdir())
    assert dirs == ["exp_one-run-a"]  # the run that did not ask for TensorBoard is not there
    run_dir = tb / dirs[0]
    assert_every_scalar_once(run_dir, 700)
    acc = tb_accumulator(run_dir)
    texts = set(acc.Tags()["tensors"])
    assert {"description/text_summary", "tags/text_summary", "notes/text_summary"} <= texts
    assert b"a test run" in acc.Tensors("description/text_summary")[0].tensor_proto.string_val[0]
    # hparams plugin: experiment, session start and end summaries with the final metrics
    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hp)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == 0.001 and start.hparams["opt.name"].string_value == "adam"
    exp = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} == set(KEYS)


def test_resend_and_uncommitted_tail_are_not_duplicated(tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    evs = run_events("r", "resend", {"tensorboard_log_dir": str(tb)}, steps=200, keys=KEYS,
                     sinks=["tensorboard"], end=False)
    batch = [(i, e) for i, e in enumerate(evs)]
    sink = TensorBoardTracker(tmp_path / "state")
    sink.open()
    sink.write(Batch(batch[:100], SinkCursor(0, 0, 100)))
    run_dir = tb / "resend-r"
    # A crash after writing the next batch but before committing it: bytes past the committed size.
    event_file = next(p for p in run_dir.iterdir() if "tfevents" in p.name)
    committed = event_file.stat().st_size
    sink.write(Batch(batch[100:150], SinkCursor(0, 0, 150)))
    # Roll the state back as if the state file had never been renamed after that write.
    state = json.loads((run_dir / STATE_FILE).read_text())
    state.update(size=committed, seq=99)
    (run_dir / STATE_FILE).write_text(json.dumps(state))
    sink.close()
    # The agent restarts: the runner re-sends from its cursor (before the acked batch too: idempotent).
    sink = TensorBoardTracker(tmp_path / "state")
    sink.open()
    sink.write(Batch(batch[50:], SinkCursor(0, 0, len(batch))))
    sink.write(Batch(batch, SinkCursor(0, 0, len(batch))))
    sink.close()
    assert_every_scalar_once(run_dir, 200)


def test_wal_replay_cli_is_resumable_and_idempotent(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    # The run never asked for TensorBoard (the node's agent had no such sink); replay delivers it anyway.
    evs = run_events("rp", "replayed", {}, steps=3000, keys=KEYS, sinks=["store"])
    write_wal(wal, evs, per_record=250)
    out = tmp_path / "tb-out"
    cmd = [sys.executable, "-m", "flightlog.agent.replay", str(wal), "--to", f"tensorboard={out}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "events delivered" in first.stderr and "ev/s" in first.stderr  # summary line and tqdm bar
    assert_every_scalar_once(out / "replayed-rp", 3000)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and ": 0 events delivered" in again.stderr
    # Forgetting the cursor re-sends everything: the sink's own state still writes each scalar once.
    forced = subprocess.run(cmd + ["--restart", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert_every_scalar_once(out / "replayed-rp", 3000)


def test_system_stats_and_nan_values(tmp_path: Path) -> None:
    from flightlog.proto.events import RunStart, SystemStats

    tb = tmp_path / "tb"
    start = RunStart(run_id="n", name="nan", timestamp=1.0, config={"tracking": {"tensorboard_log_dir": str(tb)}},
                     sinks=["tensorboard"])
    sink = TensorBoardTracker(tmp_path / "state")
    sink.open()
    sink.write(Batch([(0, start), (1, Metrics("n", 0, 1.0, {"x": float("nan"), "y": float("inf")})),
                      (2, SystemStats("n", 1.0, {"system/cpu": 50.0}, 0))], SinkCursor(0, 0, 3)))
    sink.close()
    sc = tb_scalars(tb / "nan-n")
    assert sc["y"] == [(0, float("inf"))] and sc["system/cpu"] == [(0, 50.0)]
    assert len(sc["x"]) == 1 and sc["x"][0][1] != sc["x"][0][1]
    assert not [p for p in (tb / "nan-n").iterdir() if p.name.endswith(".tmp")]
    assert (tb / "nan-n" / STATE_FILE).exists()
