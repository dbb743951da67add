"""The agent's answers to another uid's file and deletion requests (issue 13) under hostile names: whatever run
reference or path a peer sends, it gets a reply (never an exception), descriptors only of the checkpoint its
run's registry row names and only when it may read that run, and nothing is deleted that it may not delete."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.agent.access import AccessPolicy, Peer, RunOwners
from flightlog.agent.fdpass import open_run_files
from flightlog.agent.runs_rm import delete_audited
from flightlog.agent.store import Store
from flightlog.proto.checkpoint.format import TensorInfo, checksum_text
from flightlog.proto.checkpoint.registry import Registry
from flightlog.proto.checkpoint.writer import write_container
from flightlog.proto.errors import FlightlogError
from flightlog.proto.events import Metrics, RunEnd, RunFilesRequest, RunStart
from flightlog.proto.paths import AgentPaths

OWNER, OTHER = 65533, 65534
refs = st.one_of(st.text(max_size=40), st.sampled_from(["own1", "own", "o", "%", "_", "../own1", "own1\x00", ""]))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[AgentPaths, RunOwners, Path]:
    base = tmp_path_factory.mktemp("hostile")
    paths = AgentPaths(base / "data", base / "a.sock", base / "rings", base / "data" / "spill")
    paths.data_dir.mkdir(mode=0o700)
    store = Store(paths.store)
    with store.transaction():
        store.apply([RunStart("own1", "mine", 1.0), Metrics("own1", 0, 1.0, {"acc": 0.5}),
                     RunEnd("own1", "completed", 2.0)])
    store.close()
    owners = RunOwners(paths.data_dir)
    owners.claim("own1", OWNER)
    ckpt = paths.data_dir / "ckpt" / "a.flck"
    ckpt.parent.mkdir(mode=0o700)
    spec = {"path": str(ckpt), "run_id": "own1", "epoch": 1, "step": 1, "codec": "none", "level": 0}
    with Registry(paths.store) as reg:
        reg.begin(spec, str(ckpt) + ".tmp")
        with open(ckpt, "wb") as f:
            size, digest = write_container(f, [TensorInfo("w", "U8", (8,), 0, 8)], {"flightlog": json.dumps({})},
                                           memoryview(bytearray(8)), "none", 0, threads=1)
        reg.commit(spec, size, checksum_text(digest))
    from flightlog.agent.plots import render_plots

    assert render_plots(paths.store, "own1", paths.run_dir("own1") / "plots")  # as the plot service does
    return paths, owners, ckpt


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=refs, path=st.one_of(st.text(max_size=60), st.sampled_from(["/etc/shadow", ".", "/", "ckpt/a.flck"])),
       kind=st.sampled_from(["plots", "checkpoint"]), uid=st.sampled_from([OWNER, OTHER]))
def test_file_requests_hand_over_only_the_registered_checkpoint_of_a_readable_run(
        world: tuple[AgentPaths, RunOwners, Path], run: str, path: str, kind: str, uid: int) -> None:
    paths, owners, ckpt = world
    policy = AccessPolicy(multi_user=True, own_uid=999)
    before = _open_fds()
    reply, fds = open_run_files(paths, policy, owners, Peer(1, uid, uid),
                                RunFilesRequest(run, kind, path))  # type: ignore[arg-type]
    try:
        if fds:  # only to the owner, and only the run's own files (a reference may resolve as a prefix or name)
            assert reply.ok and uid == OWNER and reply.data["run_id"] == "own1"
            if kind == "checkpoint":
                assert len(fds) == 1 and os.path.abspath(path) == str(ckpt)
                assert os.fstat(fds[0]).st_ino == ckpt.stat().st_ino
            else:
                folder = paths.run_dir("own1") / "plots"
                assert sorted(os.fstat(fd).st_ino for fd in fds) == sorted(p.stat().st_ino for p in folder.iterdir())
        else:
            assert not reply.ok and reply.error
    finally:
        for fd in fds:
            os.close(fd)
    assert _open_fds() == before  # nothing left open by a refusal


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ref=refs)
def test_another_uid_deletes_nothing_whatever_it_names(world: tuple[AgentPaths, RunOwners, Path], ref: str) -> None:
    paths, owners, _ = world
    policy = AccessPolicy(multi_user=True, own_uid=999)
    with pytest.raises(FlightlogError):
        delete_audited(paths.store, paths.data_dir, ref, uid=OTHER, pid=1, allowed=(policy, owners))
    with Store(paths.store, readonly=True) as store:
        assert [r["run_id"] for r in store.runs()] == ["own1"]
