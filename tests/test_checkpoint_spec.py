"""CheckpointSpec: the typed contract of a checkpoint request, decoded by the agent's checkpoint service."""
from __future__ import annotations

import msgspec
import pytest
from conftest import AgentProcess
from hypothesis import given, settings
from hypothesis import strategies as st

from flightlog.agent.checkpoint.service import decode_spec
from flightlog.proto.control import connect
from flightlog.proto.events import CheckpointRequest, CheckpointSpec, RetentionSpec, StatusRequest


def _spec(**kw: object) -> CheckpointSpec:
    base: dict = dict(request_id="r1", path="/ckpt/a.safetensors.zst", staging="/dev/shm/x.buf", data_bytes=8,
                      tensors=[("w", "F32", [2], 0, 8)], metadata={"format": "flightlog-checkpoint/1"},
                      epoch=1, step=10)
    base.update(kw)
    return CheckpointSpec(**base)


def test_round_trip_and_defaults_in_one_place() -> None:
    spec = _spec()
    got = decode_spec(msgspec.msgpack.encode(spec))
    assert got == spec
    assert got.retention == RetentionSpec() and got.codec == "zstd" and got.upload == "none"
    assert got.is_best is None and got.min_free_bytes == 0


def test_a_dict_spec_of_an_older_sdk_still_decodes() -> None:
    old = {"v": 1, "request_id": "r", "path": "/c/x.safetensors.zst", "staging": "/dev/shm/b", "data_bytes": 4,
           "tensors": [["w", "F32", [1], 0, 4]], "metadata": {"format": "x"}, "codec": "gzip", "level": 6,
           "epoch": 0, "step": 3, "retention": {"max_checkpoints": 2, "monitor": "val_loss", "mode": "max"},
           "unknown_new_key": 5}
    got = decode_spec(msgspec.msgpack.encode(old))
    assert isinstance(got, CheckpointSpec)
    assert got.codec == "gzip" and got.retention.max_checkpoints == 2 and got.retention.mode == "max"
    assert got.tensors == [("w", "F32", [1], 0, 4)]


@pytest.mark.parametrize("change,message", [
    ({"data_bytes": "8"}, "data_bytes"),
    ({"data_bytes": -1}, "data_bytes"),
    ({"path": "relative/a.zst"}, "must be absolute"),
    ({"codec": "lz4"}, "unknown checkpoint codec 'lz4'"),
    ({"tensors": [["w", "F32", [2], 0, 16]]}, "outside the 8 staged"),
    ({"tensors": [["w", "Q4", [2], 0, 8]]}, "unknown dtype 'Q4'"),
    ({"retention": {"mode": "median"}}, "retention.mode"),
    ({"upload": "some"}, "upload"),
])
def test_malformed_specs_name_the_key(change: dict, message: str) -> None:
    raw = msgspec.to_builtins(_spec())
    raw.update(change)
    got = decode_spec(msgspec.msgpack.encode(raw))
    assert isinstance(got, str) and message in got


def test_missing_key_is_named() -> None:
    raw = msgspec.to_builtins(_spec())
    del raw["staging"]
    got = decode_spec(msgspec.msgpack.encode(raw))
    assert isinstance(got, str) and "staging" in got


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_gives_an_error_message_only(data: bytes) -> None:
    got = decode_spec(data)  # anything but DecodeError escapes and fails the test
    assert isinstance(got, (str, CheckpointSpec))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255))
def test_mutated_valid_specs_give_a_spec_or_a_message(pos: int, byte: int) -> None:
    raw = bytearray(msgspec.msgpack.encode(_spec()))
    raw[pos % len(raw)] = byte
    assert isinstance(decode_spec(bytes(raw)), (str, CheckpointSpec))


def test_the_agent_answers_a_malformed_request_and_keeps_the_connection(agent: AgentProcess) -> None:
    client = connect(agent.paths)
    assert client is not None
    try:
        bad = msgspec.to_builtins(_spec())
        bad["data_bytes"] = "lots"
        reply = client.request(CheckpointRequest("r-bad", msgspec.Raw(msgspec.msgpack.encode(bad))))
        assert not reply.ok and "malformed checkpoint request" in reply.error and "data_bytes" in reply.error
        reply = client.request(CheckpointRequest.of(_spec(request_id="r-rel", path="rel/x.zst")))
        assert not reply.ok and "must be absolute" in reply.error
        assert client.request(StatusRequest()).ok  # the same connection still serves
    finally:
        client.close()
