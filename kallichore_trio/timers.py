"""Periodic wake-ups on a shared grid, so that timers with the same period expire together.

An idle daemon's CPU goes mostly to Trio scheduler rounds, and every timer that expires on its
own costs one: with 20 sessions, the heartbeats (every 2 s each) and the sockets' safety ticks
(every 5 s each) were about 35 rounds a second. Periodic work whose phase does not matter waits
for the next multiple of its period on Trio's clock instead of one period from now. Timers with
the same period, or with periods that divide each other, then expire in the same round.
"""

from __future__ import annotations

import math

import trio


def next_multiple(period: float) -> float:
    """The first multiple of `period` on Trio's clock at least half a period from now: a
    deadline between 0.5 and 1.5 periods away. Never sooner, so that a safety timeout still
    means half a period of silence, and a periodic task never runs twice in quick succession."""
    if period <= 0:
        raise ValueError(f"period must be positive, not {period!r}")
    return math.ceil((trio.current_time() + period / 2) / period) * period
