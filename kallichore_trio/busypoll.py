"""BusyPoll: for a moment after traffic, the event loop polls instead of sleeping.

A Jupyter exchange is a burst of messages a fraction of a millisecond apart (a `1+1` is a
request, busy, execute_input, execute_result, idle and the reply within ~4 ms). Between two of
them the daemon's loop would sleep in `epoll_wait`, the CPU would go idle, and the next message
would first have to wake it. On the 2-core VMs we measure on the guest halts at once
(`guest_halt_poll_ns` is 0), and waking a halted virtual CPU costs more than relaying the
message. So after each message relayed in either direction, one task keeps the loop turning
(checkpoint, `sched_yield`) for `window` seconds, and the loop polls its sockets with a zero
timeout in every turn. `sched_yield` hands the core to any other runnable thread first, so a
kernel sharing the core gets it whenever it can run: the polling takes idle time.

It is off by default (Config.busy_poll is 0): while traffic keeps coming (a chatty comm) it
keeps a core busy, which on a laptop is battery and fan for a gain nobody perceives. It is a
latency-for-CPU trade for benchmarks and test harnesses (`--busy-poll MS`; figures in
docs/performance.md). An idle daemon never polls: heartbeats, keep-alive pings and resource
samples are not traffic.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

_yield_cpu: Callable[[], None] = getattr(os, "sched_yield", lambda: None)


class BusyPoll:
    """Polls for `window` seconds after the last `on_traffic`; 0 turns it off. `run` is its task."""

    def __init__(self, window: float, *, clock: Callable[[], float] = trio.current_time) -> None:
        if window < 0:
            raise ValueError(f"the busy-poll window must be >= 0, not {window!r}")
        self.window = window
        self._clock = clock
        self._traffic_reports = 0
        self._parked: trio.Event | None = None
        #: True while the loop is kept turning; the counts are for tests and the repr.
        self.polling = False
        self.periods = 0  # polling periods begun
        self.turns = 0  # loop turns spent polling

    def __repr__(self) -> str:
        state = "polling" if self.polling else "parked"
        return (f"<BusyPoll window={self.window * 1e3:g} ms {state} periods={self.periods} "
                f"turns={self.turns}>")

    @property
    def traffic_reports(self) -> int:
        """How many times traffic was reported (on_traffic calls)."""
        return self._traffic_reports

    def on_traffic(self) -> None:
        """Traffic: poll until `window` after now. Cheap: called once per batch from a kernel
        and once per client message."""
        self._traffic_reports += 1
        if self._parked is not None:
            self._parked.set()

    async def run(self) -> None:
        if self.window == 0:
            return
        while True:
            self._parked = parked = trio.Event()
            await parked.wait()
            self._parked = None
            self.periods += 1
            self.polling = True
            try:
                await self._poll()
            finally:
                self.polling = False

    async def _poll(self) -> None:
        seen = self._traffic_reports
        until = self._clock() + self.window
        while True:
            _yield_cpu()
            await trio.lowlevel.checkpoint()
            self.turns += 1
            if self._traffic_reports != seen:
                seen = self._traffic_reports
                until = self._clock() + self.window
            elif self._clock() >= until:
                return
