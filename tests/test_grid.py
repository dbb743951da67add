"""The agent's periodic tasks share a one-second grid, so the event loop wakes once a second for all of
them rather than once per task at its own phase."""
from __future__ import annotations

import anyio
from hypothesis import given
from hypothesis import strategies as st

from flightlog.agent.grid import GRID_SECONDS, next_tick, sleep_on_grid


@given(now=st.floats(0, 1e7), period=st.sampled_from([1.0, 2.0, 5.0, 30.0]))
def test_a_periodic_task_wakes_on_the_grid_about_a_period_later(now: float, period: float) -> None:
    t = next_tick(now, period)
    assert t == round(t / GRID_SECONDS) * GRID_SECONDS  # on the grid
    assert now + period - GRID_SECONDS / 2 <= t <= now + period + GRID_SECONDS / 2 + 1e-6


@given(phase=st.floats(0, 0.49), work=st.floats(0, 0.4))
def test_a_task_that_woke_on_the_grid_and_worked_wakes_one_period_later(phase: float, work: float) -> None:
    g = 1000.0
    assert next_tick(g + work, 1.0) == g + 1.0
    assert next_tick(g + work, 5.0) == g + 5.0
    assert next_tick(g - phase + work, 2.0) in (g + 1.0, g + 2.0)  # never two periods' worth


def test_a_short_period_is_not_aligned() -> None:
    assert next_tick(10.3, 0.1) == 10.3 + 0.1


def test_two_tasks_started_apart_wake_together() -> None:
    woke: list[float] = []

    async def task(delay: float) -> None:
        await anyio.sleep(delay)
        await sleep_on_grid(1.0)
        woke.append(anyio.current_time())

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(task, 0.0)
            tg.start_soon(task, 0.3)

    anyio.run(main)
    # Either both in the same second (same timer), or a start straddled the half-step: one second apart.
    assert abs(woke[0] - woke[1]) < 0.05 or abs(abs(woke[0] - woke[1]) - 1.0) < 0.05
    assert all(abs(w - round(w)) < 0.05 for w in woke)


def test_a_deadline_before_the_tick_wins() -> None:
    async def main() -> float:
        t0 = anyio.current_time()
        await sleep_on_grid(5.0, t0 + 0.05)
        return anyio.current_time() - t0

    assert anyio.run(main) < 1.0
