"""``log_metrics``, the hot path: built once per tracker as a closure over its ring, its encode buffer and
its step, so a call pays no attribute look-ups, no lock and no syscall on the owner thread. Any other thread
takes the checked, locked path into the transport's side channel.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from flightlog.cuda_values import CudaStager, PendingPoints, device_values
from flightlog.progress import NEVER
from flightlog.proto.codec import event_encoder
from flightlog.proto.events import Metrics
from flightlog.transport import NO_OWNER, Transport
from flightlog.validate import INT64_MAX, KeyRules, check_step, coerce_metrics

__all__ = ["MetricsPath"]

log = logging.getLogger("flightlog")

#: Metrics is tagged and array_like: on the wire it is ``["m", run_id, step, timestamp, values]``, which is
#: what this tuple encodes to, byte for byte (tests pin it), 40 ns cheaper than building the Struct.
_TAG = Metrics.__struct_config__.tag


class MetricsPath:
    """The run's step and progress threshold, and ``log_metrics`` as a closure over them.

    ``tick(step)`` is called when a step reaches ``progress_next`` (set by the tracker's progress());
    it returns the next threshold.
    """

    def __init__(self, run_id: str, transport: Transport, rules: KeyRules,
                 tick: Callable[[int], int], rank: int = 0) -> None:
        self.run_id = run_id
        self.rank = rank  # appended to each point when not 0 (rank 0's points encode as they always did)
        self._transport = transport
        self._rules = rules
        self._tick = tick
        self._lock = threading.Lock()  # the non-owner path's step update
        self._warned_backwards = False
        self._refusal: Callable[[], Exception] | None = None  # set by retire(): the finished run's error
        self._stager: CudaStager | None = None  # made at the first CUDA value (torch is imported by then)
        self._pending = PendingPoints(self._emit_staged, self._release)
        self.log_metrics, self._get, self._set = self._build()

    # --- state shared with the closure --------------------------------------------------------

    @property
    def step(self) -> int:
        """The last step logged (-1 before the first)."""
        return self._get()[0]

    @property
    def progress_next(self) -> int:
        return self._get()[1]

    @progress_next.setter
    def progress_next(self, value: int) -> None:
        self._set(progress_next=value)

    def retire(self, refusal: Callable[[], Exception]) -> None:
        """The run is finished: every later call takes the other-thread path, which raises ``refusal()``.
        The owner's hot path pays nothing for this: it already compares the thread with the owner."""
        self._refusal = refusal
        self._set(owner=NO_OWNER, progress_next=NEVER)

    # --- the paths ------------------------------------------------------------------------------

    def _build(self) -> tuple[Callable[..., None], Callable[[], tuple[int, int]], Callable[..., None]]:
        transport, rules, tick = self._transport, self._rules, self._tick
        run_id, tag, rank = self.run_id, _TAG, self.rank
        known = rules.known
        owner = transport.owner
        ring = getattr(transport, "ring", None)
        write = ring.write_frame if ring is not None else None
        buf = getattr(transport, "buf", bytearray(0))
        encode_into, now, ident = event_encoder.encode_into, time.time, threading.get_ident
        _type, _float, _int, _max = type, float, int, INT64_MAX
        last, progress_next = -1, NEVER
        resolve = self._resolve_step

        waiting = False  # CUDA values staged whose copies may not be done yet
        pending, device = self._pending, device_values

        def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
            nonlocal last, progress_next, waiting
            if ident() != owner:
                return other_thread(metrics, step)
            if waiting:
                waiting = pending.poll()
            try:
                for k, v in metrics.items():
                    if (_type(v) is not _float and _type(v) is not _int) or k not in known:
                        staged = device(metrics)
                        if staged:  # 0-dim CUDA tensors: copied without a sync, handed over once done
                            step = last + 1 if step is None else resolve(step, last)
                            last = step
                            waiting = self._stage(metrics, staged, step, now())
                            return None
                        metrics = self._checked(metrics)
                        break
            except AttributeError:
                metrics = self._checked(metrics)  # not a mapping: raises a clear TypeError
            if step is None:
                step = last + 1
                if step > _max:
                    step = resolve(step, last)
            elif _type(step) is not _int or not last <= step <= _max:
                step = resolve(step, last)
            last = step
            try:
                if rank:
                    encode_into((tag, run_id, step, now(), metrics, rank), buf, 0)
                else:
                    encode_into((tag, run_id, step, now(), metrics), buf, 0)
            except OverflowError:  # an int value beyond 64 bits: it goes as a float
                encode_into((tag, run_id, step, now(), coerce_metrics(metrics), rank), buf, 0)
            write(buf)  # type: ignore[misc]  # the socket transport has no owner: never reached
            if step >= progress_next:  # progress off: never true; on: about every 0.5 s
                progress_next = tick(step)

        def other_thread(metrics: Mapping[str, float], step: int | None) -> None:
            nonlocal last, progress_next
            if self._refusal is not None:
                raise self._refusal()
            values = self._checked(metrics)
            with self._lock:
                step = last + 1 if step is None else step
                if _type(step) is not _int or not last <= step <= _max:
                    step = resolve(step, last)
                last = step
                transport.emit_side(Metrics(run_id, step, now(), values, rank))
                if step >= progress_next:
                    progress_next = tick(step)

        def get() -> tuple[int, int]:
            return last, progress_next

        def set_(**kw: int) -> None:
            nonlocal owner, progress_next, waiting
            owner = kw.get("owner", owner)
            progress_next = kw.get("progress_next", progress_next)
            waiting = bool(kw.get("waiting", waiting))

        return log_metrics, get, set_

    # --- CUDA values ---------------------------------------------------------------------------------

    def _stage(self, metrics: Mapping[str, Any], staged: dict[str, Any], step: int, timestamp: float) -> bool:
        host = self._checked({k: v for k, v in metrics.items() if k not in staged})
        self._checked(dict.fromkeys(staged, 0.0))  # the staged keys pass the same checks, now
        if self._stager is None:
            self._stager = CudaStager()
        slots, ready = self._stager.stage(staged)
        return self._pending.add(step, timestamp, host, slots, ready)

    def _emit_staged(self, step: int, timestamp: float, values: dict[str, float | int]) -> None:
        self._transport.emit(Metrics(self.run_id, step, timestamp, values, self.rank))

    def _release(self, slots: Any, ready: Any) -> None:
        if self._stager is not None:
            self._stager.release(slots, ready)

    def drain(self) -> None:
        """Hand every staged CUDA value to the ring, waiting for its copy (flush and finish)."""
        self._pending.drain()
        self._set(waiting=False)

    def _checked(self, metrics: Any) -> dict[str, float | int]:
        values = coerce_metrics(metrics)
        self._rules.metrics(values)  # checks the keys not seen before and remembers them
        return values

    def _resolve_step(self, step: Any, last: int) -> int:
        checked = check_step(step)
        if checked < last and not self._warned_backwards:
            self._warned_backwards = True
            log.warning("flightlog: step went backwards (%d after %d); points are recorded as given", checked, last)
        return checked
