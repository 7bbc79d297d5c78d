"""Periodic wake-ups on a shared grid (kallichore_trio/timers.py), on Trio's mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kallichore_trio.timers import next_multiple

# Each row: the clock, the period, the deadline. Always a multiple of the period, and between
# half a period and one and a half periods away.
CASES = [
    pytest.param(100.0, 5.0, 105.0, id="on a grid point: the next one"),
    pytest.param(102.4, 5.0, 105.0, id="more than half a period before a grid point"),
    pytest.param(102.6, 5.0, 110.0, id="less than half a period before: the one after"),
    pytest.param(102.5, 5.0, 105.0, id="exactly half a period before"),
    pytest.param(0.3, 1.0, 1.0, id="a short period"),
    pytest.param(7.0, 2.0, 8.0, id="an odd clock, an even period"),
]


@pytest.mark.parametrize(("now", "period", "deadline"), CASES)
async def test_the_next_grid_point(
    autojump_clock: trio.testing.MockClock, now: float, period: float, deadline: float
) -> None:
    autojump_clock.jump(now - trio.current_time())
    assert next_multiple(period) == pytest.approx(deadline)


@pytest.mark.parametrize("period", [0.0, -1.0])
async def test_a_period_must_be_positive(period: float) -> None:
    with pytest.raises(ValueError, match="period must be positive"):
        next_multiple(period)


async def test_timers_started_apart_expire_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    woke: list[float] = []

    async def periodic(start_after: float) -> None:
        await trio.sleep(start_after)
        for _ in range(3):
            await trio.sleep_until(next_multiple(2.0))
            woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for start_after in (0.1, 0.4, 0.9):
            nursery.start_soon(periodic, start_after)
    # All three wake at the same instants although they started up to 0.8 s apart.
    assert sorted(set(woke)) == [2.0, 4.0, 6.0]
    assert len(woke) == 9
