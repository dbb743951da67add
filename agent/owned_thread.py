"""A blocking loop on a thread of its own, owned by an anyio task like any other: the task waits for the
thread, and cancelling the task tells the thread to stop (and waits for it). The ingest loop and every sink
runner run this way: a wake-up is then a condition variable or a socket, not hops between the event loop
and the thread pool."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

__all__ = ["run_owned_thread"]

T = TypeVar("T")


async def run_owned_thread(body: Callable[[], T], stop: Callable[[], None]) -> T:
    """Run ``body`` on its own thread until it returns; if the calling task is cancelled first, call
    ``stop`` (thread-safe: it must make ``body`` return soon) and wait for ``body`` to return."""

    async def stop_on_cancel() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_cancel)
        try:
            result = await anyio.to_thread.run_sync(body, limiter=anyio.CapacityLimiter(1))
        finally:
            tg.cancel_scope.cancel()
    return result
