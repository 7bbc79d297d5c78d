"""BusyPoll (kallichore_trio/busypoll.py): polls for its window after traffic, then parks.

The poller reads time from a clock it is given, so these tests move time by hand; Trio's own
clock keeps running and `wait_all_tasks_blocked` tells a parked poller from a polling one
(a polling task is never blocked).
"""

from __future__ import annotations

import inspect
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from httpx_ws import aconnect_ws

from kallichore_trio import config
from kallichore_trio.busypoll import BusyPoll
from kallichore_trio.kernel.kernel import Kernel
from kallichore_trio.session.session import Session
from tests.helpers import (
    RunningDaemon,
    collect_until_done,
    daemon_config,
    execute_request,
    is_idle_for,
    running_daemon,
)


class HandClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def turns(n: int = 20) -> None:
    """Let the poller run a few loop turns."""
    for _ in range(n):
        await trio.lowlevel.checkpoint()


async def parks(poller: BusyPoll) -> bool:
    """True if the poller ends up parked: every task blocked within a generous bound."""
    with trio.move_on_after(5):
        await trio.testing.wait_all_tasks_blocked()
        return not poller.polling
    return False


async def test_polls_for_the_window_after_traffic_then_parks() -> None:
    clock = HandClock()
    poller = BusyPoll(0.002, clock=clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        assert await parks(poller)
        assert poller.turns == 0  # no traffic, no polling

        poller.on_traffic()
        await turns()
        assert poller.polling
        started = poller.turns
        assert started > 0

        clock.now = 0.0019  # still inside the window
        await turns()
        assert poller.polling
        assert poller.turns > started

        clock.now = 0.0021
        assert await parks(poller)
        assert poller.periods == 1
        nursery.cancel_scope.cancel()


# Each row: (time of an on_traffic call) ..., then the instants at which the poller must
# still be polling, and the instant from which it must be parked.
WINDOWS = [
    pytest.param([0.0], [0.001, 0.00199], 0.002, id="one report: the window from it"),
    pytest.param([0.0, 0.0015], [0.0025, 0.0034], 0.0036,
                 id="a report while polling extends the window from that report"),
    pytest.param([0.0, 0.0005, 0.001, 0.0015], [0.003, 0.00349], 0.0035,
                 id="a burst: the window from its last message"),
]


@pytest.mark.parametrize(("reports", "polling_at", "parked_at"), WINDOWS)
async def test_the_window_runs_from_the_last_traffic_report(
    reports: list[float], polling_at: list[float], parked_at: float
) -> None:
    clock = HandClock()
    poller = BusyPoll(0.002, clock=clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        await trio.testing.wait_all_tasks_blocked()
        for at in reports:
            clock.now = at
            poller.on_traffic()
            await turns()
        for at in polling_at:
            clock.now = at
            await turns()
            assert poller.polling, at
        clock.now = parked_at
        assert await parks(poller)
        assert poller.periods == 1  # one period, extended; not one per report
        nursery.cancel_scope.cancel()


async def test_traffic_after_parking_starts_a_new_period() -> None:
    clock = HandClock()
    poller = BusyPoll(0.002, clock=clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        await trio.testing.wait_all_tasks_blocked()
        for period in (1, 2, 3):
            poller.on_traffic()
            await turns()
            assert poller.polling
            clock.now += 0.01
            assert await parks(poller)
            assert poller.periods == period
        nursery.cancel_scope.cancel()


async def test_other_tasks_run_while_it_polls() -> None:
    poller = BusyPoll(60.0)  # Trio's clock: polls for the whole test
    done = trio.Event()

    async def worker() -> None:
        await trio.sleep(0.01)  # a timer fires while the loop polls
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        await trio.testing.wait_all_tasks_blocked()
        poller.on_traffic()
        nursery.start_soon(worker)
        with trio.fail_after(5):
            await done.wait()
        assert poller.polling
        nursery.cancel_scope.cancel()  # cancellation reaches it mid-poll


async def test_cancellation_mid_poll_is_not_swallowed() -> None:
    poller = BusyPoll(60.0)
    with trio.move_on_after(0.05) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            await trio.testing.wait_all_tasks_blocked()
            poller.on_traffic()
    assert scope.cancelled_caught
    assert poller.turns > 0


async def test_a_zero_window_never_polls() -> None:
    poller = BusyPoll(0.0)
    with trio.fail_after(5):
        await poller.run()  # returns at once: nothing to do, ever
    poller.on_traffic()
    assert poller.turns == 0 and poller.periods == 0


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        BusyPoll(-0.001)


def test_repr_shows_state() -> None:
    assert repr(BusyPoll(0.002)) == "<BusyPoll window=2 ms parked periods=0 turns=0>"


def test_polling_is_off_by_default() -> None:
    assert config.Config().busy_poll == 0.0


# ---- in the daemon: what counts as traffic ----------------------------------------------


@pytest.fixture
def poller() -> BusyPoll:
    return BusyPoll(0.002)


@pytest.fixture
async def polled(
    nursery: trio.Nursery, tmp_path: Path, poller: BusyPoll
) -> AsyncIterator[RunningDaemon]:
    async for running in running_daemon(nursery, daemon_config(tmp_path), busy_poll=poller):
        yield running


async def settled(poller: BusyPoll) -> int:
    """Wait for the poller to park after whatever came before; its period count then."""
    with trio.fail_after(10):
        while poller.polling:
            await trio.sleep(0.01)
    return poller.periods


async def test_a_client_message_is_traffic(polled: RunningDaemon, poller: BusyPoll) -> None:
    # A session that was never started: the message is held, and nothing comes back.
    session_id = await polled.create()
    async with aconnect_ws(f"{polled.ws_base}/sessions/{session_id}/channels",
                           polled.client) as ws:
        before = await settled(poller)
        await ws.send_text(json.dumps(execute_request("1+1")))
        with trio.fail_after(10):
            while poller.periods == before:
                await trio.sleep(0.001)


async def test_kernel_messages_are_traffic_and_an_idle_session_is_not(
    polled: RunningDaemon, poller: BusyPoll, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count what may report traffic to the poller (batches relayed from a kernel) and what must
    # not (heartbeats, resource samples), so the check below needs no quiet period.
    seen = {"relays": 0, "heartbeats": 0, "samples": 0}
    changed = trio.Event()

    def counting(name: str, method: Any) -> Any:
        if inspect.iscoroutinefunction(method):
            async def async_wrapper(*args: Any) -> Any:
                seen[name] += 1
                changed.set()
                return await method(*args)
            return async_wrapper

        def wrapper(*args: Any) -> Any:
            seen[name] += 1
            changed.set()
            return method(*args)
        return wrapper

    monkeypatch.setattr(Kernel, "_relay", counting("relays", Kernel._relay))
    monkeypatch.setattr(Session, "on_heartbeat",
                        counting("heartbeats", Session.on_heartbeat))
    monkeypatch.setattr(Session, "on_resource_usage",
                        counting("samples", Session.on_resource_usage))
    session_id = await polled.create()
    assert poller.periods == 0
    response = await polled.start(session_id)
    assert response.status_code == 200, response.text
    # The start's kernel_info exchange is the daemon's own: only the kernel's side of it was
    # relayed through the pumps, and that polled.
    with trio.fail_after(10):
        while poller.periods == 0:
            await trio.sleep(0.01)
    async with aconnect_ws(f"{polled.ws_base}/sessions/{session_id}/channels",
                           polled.client) as ws:
        idle = await settled(poller)
        # Heartbeats (every 2 s), resource samples (every 1 s) and the client connection are
        # not traffic: over two of each, the only reports are batches the kernel sent (a late
        # reply to a repeated start probe, say), one report per batch.
        before = dict(seen), poller.traffic_reports
        with trio.fail_after(20):
            while (seen["heartbeats"] < before[0]["heartbeats"] + 2
                   or seen["samples"] < before[0]["samples"] + 2):
                changed = trio.Event()
                await changed.wait()
        assert poller.traffic_reports - before[1] == seen["relays"] - before[0]["relays"]
        relays = seen["relays"]
        idle = await settled(poller)
        msg_id = uuid.uuid4().hex
        await ws.send_text(json.dumps(execute_request("1+1", msg_id)))
        frames = await collect_until_done(ws, msg_id)
        assert any(is_idle_for(f, msg_id) for f in frames)
        assert seen["relays"] > relays
        assert poller.periods > idle
        assert await settled(poller) >= idle + 1
