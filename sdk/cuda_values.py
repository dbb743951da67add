"""CUDA values without a host sync: a 0-dim CUDA tensor handed to ``log_metrics`` is copied into a pinned host
slot with ``non_blocking=True`` and a CUDA event is recorded after the copy; the point goes to the ring once
its event has completed (checked on later ``log_metrics`` calls, and waited for at flush and finish), so the
training step never waits for the GPU as ``.item()`` would.

The pending logic (``PendingPoints``) only needs objects with ``query()``/``synchronize()`` and slots with
``item()``: the CUDA part (``CudaStager``) is the one place that speaks torch.
"""
from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["Ready", "Slot", "PendingPoints", "CudaStager", "device_values", "MAX_PENDING"]

#: Points waiting for their copies; past this the oldest is waited for (memory stays bounded when the GPU
#: runs far behind the host, e.g. a value logged every step of a long asynchronous queue).
MAX_PENDING = 4096


class Ready(Protocol):
    """What a staged point waits on: a CUDA event, or anything that says when the copies are done."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Slot(Protocol):
    """Where a value lands on the host (a pinned 0-dim tensor); read only once its point is ready."""

    def item(self) -> float | int: ...


def device_values(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``metrics`` that are 0-dim CUDA tensors ({} without torch imported: nothing to stage)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    tensor = torch.Tensor
    return {k: v for k, v in metrics.items() if isinstance(v, tensor) and v.is_cuda and v.dim() == 0}


class _Point:
    __slots__ = ("step", "timestamp", "values", "slots", "ready")

    def __init__(self, step: int, timestamp: float, values: dict[str, float | int],
                 slots: dict[str, Slot], ready: list[Ready]) -> None:
        self.step, self.timestamp, self.values, self.slots, self.ready = step, timestamp, values, slots, ready


class PendingPoints:
    """Staged points in the order they were logged; ``emit(step, timestamp, values)`` hands each to the ring
    once every one of its ``ready`` objects says so. ``release(slots, ready)`` gives slots and events back for
    reuse once read."""

    def __init__(self, emit: Callable[[int, float, dict[str, float | int]], None],
                 release: Callable[[dict[str, Slot], list[Ready]], None] | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self._emit = emit
        self._release = release
        self._max = max_pending
        self._points: deque[_Point] = deque()

    def __len__(self) -> int:
        return len(self._points)

    def add(self, step: int, timestamp: float, values: dict[str, float | int], slots: dict[str, Slot],
            ready: list[Ready]) -> bool:
        """Queue a point (host values now, ``slots`` once ready); True while any point is still pending."""
        self._points.append(_Point(step, timestamp, values, slots, ready))
        if len(self._points) > self._max:
            self._hand_over(self._points.popleft(), wait=True)
        return self.poll()

    def poll(self) -> bool:
        """Hand over the leading points whose copies are done (in logging order); True while some wait."""
        points = self._points
        while points and all(r.query() for r in points[0].ready):
            self._hand_over(points.popleft(), wait=False)
        return bool(points)

    def drain(self) -> None:
        """Wait for every pending copy and hand every point over (flush and finish)."""
        while self._points:
            self._hand_over(self._points.popleft(), wait=True)

    def _hand_over(self, point: _Point, *, wait: bool) -> None:
        if wait:
            for r in point.ready:
                r.synchronize()
        values = dict(point.values)
        for key, slot in point.slots.items():
            values[key] = slot.item()  # a host tensor whose copy completed: no device sync
        if self._release is not None:
            self._release(point.slots, point.ready)
        self._emit(point.step, point.timestamp, values)


class CudaStager:
    """Pinned slots (one pool per dtype) and CUDA events, reused: ``stage`` copies each CUDA value into a slot
    with ``non_blocking=True`` on its device's current stream and records one event per device after them."""

    def __init__(self) -> None:
        self._slots: dict[Any, list[Any]] = {}
        self._events: list[Any] = []

    def stage(self, values: Mapping[str, Any]) -> tuple[dict[str, Slot], list[Ready]]:
        import torch

        slots: dict[str, Slot] = {}
        devices: dict[Any, None] = {}
        for key, tensor in values.items():
            free = self._slots.get(tensor.dtype)
            slot = free.pop() if free else torch.empty((), dtype=tensor.dtype, pin_memory=True)
            slot.copy_(tensor.detach(), non_blocking=True)
            slots[key] = slot
            devices[tensor.device] = None
        ready: list[Ready] = []
        for device in devices:
            event = self._events.pop() if self._events else torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(device))
            ready.append(event)
        return slots, ready

    def release(self, slots: dict[str, Slot], ready: list[Ready]) -> None:
        for slot in slots.values():
            self._slots.setdefault(slot.dtype, []).append(slot)  # type: ignore[attr-defined]
        self._events.extend(ready)
