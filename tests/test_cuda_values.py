"""Issue 11, item 6: a 0-dim CUDA tensor given to log_metrics is never read with a host sync in the step: it
is copied into a pinned slot without blocking and handed to the ring once its CUDA event completed (on a
later call, or at flush). The pending logic is tested on CPU with event-like gates; the CUDA path on a GPU."""
from __future__ import annotations

from typing import Any

import pytest
from conftest import AgentProcess
from test_pipeline import wait_points

import flightlog
from flightlog.cuda_values import PendingPoints
from flightlog.proto.paths import AgentPaths


class Gate:
    """Event-like: ``query()`` says whether the copy is done; ``synchronize()`` waits (here: completes it)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


class Box:
    """A host slot: read only once its gate opened (reading early is the bug this module prevents)."""

    def __init__(self, value: float, gate: Gate) -> None:
        self.value, self.gate = value, gate

    def item(self) -> float:
        assert self.gate.done, "a slot was read before its copy completed"
        return self.value


def _pending(max_pending: int = 100) -> tuple[PendingPoints, list[tuple[int, dict[str, Any]]], list[Any]]:
    out: list[tuple[int, dict[str, Any]]] = []
    released: list[Any] = []
    pp = PendingPoints(lambda step, ts, values: out.append((step, values)),
                       lambda slots, ready: released.extend(ready), max_pending)
    return pp, out, released


def test_points_are_handed_over_once_their_copies_completed_in_logging_order() -> None:
    pp, out, released = _pending()
    g0, g1 = Gate(), Gate()
    assert pp.add(0, 1.0, {"lr": 0.1}, {"loss": Box(2.5, g0)}, [g0]) is True
    assert pp.add(1, 2.0, {}, {"loss": Box(1.5, g1)}, [g1]) is True
    assert out == [] and len(pp) == 2
    g1.done = True  # the later copy done first: it still waits for the earlier point
    assert pp.poll() is True and out == []
    g0.done = True
    assert pp.poll() is False
    assert out == [(0, {"lr": 0.1, "loss": 2.5}), (1, {"loss": 1.5})]
    assert released == [g0, g1] and g0.waited == g1.waited == 0  # polling never waits


def test_drain_waits_for_every_copy_and_a_full_queue_waits_for_its_oldest() -> None:
    pp, out, _ = _pending(max_pending=2)
    gates = [Gate() for _ in range(3)]
    for i, g in enumerate(gates):
        pp.add(i, float(i), {}, {"x": Box(float(i), g)}, [g])
    assert out == [(0, {"x": 0.0})] and gates[0].waited == 1  # the third point: the oldest is waited for
    pp.drain()
    assert out == [(i, {"x": float(i)}) for i in range(3)] and len(pp) == 0
    two = [Gate(), Gate()]  # values on two devices: one event each, the point waits for both
    pp.add(9, 9.0, {}, {"a": Box(1.0, two[0]), "b": Box(2.0, two[1])}, two)
    two[0].done = True
    assert pp.poll() is True
    two[1].done = True
    assert pp.poll() is False and out[-1] == (9, {"a": 1.0, "b": 2.0})


def test_cuda_loss_is_logged_without_a_host_sync(agent_paths: AgentPaths, base_config: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch.cuda is not available on this machine: the CUDA path needs a GPU (the pending "
                    "logic is tested on CPU above)")
    agent = AgentProcess(agent_paths).start()
    try:
        _log_cuda_values(torch, agent_paths, base_config)
    finally:
        agent.stop()


def _log_cuda_values(torch: Any, agent_paths: AgentPaths, base_config: dict) -> None:
    n = 20
    with flightlog.experiment_tracking("cuda-values", base_config) as t:
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call (.item(), float()) raises
        try:
            for i in range(n):
                torch.cuda._sleep(2_000_000)  # a long kernel ahead of the value on the stream
                loss = torch.full((), float(i), device="cuda") * 2
                t.log_metrics({"loss": loss, "lr": 0.5}, step=i)
            staged = len(t._metrics._pending)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert staged > 0  # the copies were still running when log_metrics returned
        t.flush()
        run_id = t.run_id
    points = wait_points(agent_paths, run_id, 2 * n)
    assert sorted((p["step"], p["value"]) for p in points if p["key"] == "loss") == [(i, 2.0 * i) for i in range(n)]
    assert len([p for p in points if p["key"] == "lr"]) == n
