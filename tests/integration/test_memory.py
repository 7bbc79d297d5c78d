"""Handing memory back after bursts of output (kallichore_trio/memory.py)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from httpx_ws import aconnect_ws

from kallichore_trio.config import AllocatorTrim
from kallichore_trio.memory import BurstWatch, load_malloc_trim, trim_after_bursts
from tests.helpers import (
    RunningDaemon,
    collect_until_done,
    daemon_config,
    execute_request,
    running_daemon,
)

# Each row: the per-session counts seen at successive checks, and whether each check trims.
BURSTS = [
    pytest.param([{}, {}, {}], [False, False, False], id="idle never trims"),
    pytest.param([{"a": 100}, {"a": 100}], [False, False], id="a small burst does not trim"),
    pytest.param([{"a": 600}, {"a": 600}, {"a": 600}], [False, True, False],
                 id="a burst trims once, when it is over"),
    pytest.param([{"a": 600}, {"a": 900}, {"a": 1200}, {"a": 1200}],
                 [False, False, False, True], id="continuous output waits for the end"),
    pytest.param([{"a": 300, "b": 300}, {"a": 300, "b": 300}], [False, True],
                 id="sessions add up"),
    pytest.param([{"a": 300}, {"a": 300}, {"a": 600}, {"a": 600}], [False, False, False, True],
                 id="small bursts add up"),
    pytest.param([{"a": 600}, {"a": 620}, {"a": 640}], [False, True, False],
                 id="resource samples still count as quiet"),
    pytest.param([{"a": 600}, {"a": 650}, {"a": 650}], [False, False, True],
                 id="a tenth of a burst is not quiet"),
    pytest.param([{"a": 600}, {}, {}], [False, True, False],
                 id="a deleted session's burst still counts"),
    pytest.param([{"a": 600}, {"a": 600}, {"a": 100}, {"a": 100}], [False, True, False, False],
                 id="a recreated session starts from its own count"),
]


@pytest.mark.parametrize(("checks", "trims"), BURSTS)
def test_burst_watch(checks: list[dict[str, int]], trims: list[bool]) -> None:
    watch = BurstWatch(500)
    assert [watch.observe(seen) for seen in checks] == trims


def test_this_c_library_has_malloc_trim() -> None:
    trim = load_malloc_trim()
    assert trim is not None
    assert trim() in (0, 1)  # 1: memory was released, 0: there was nothing to release


async def test_the_trimmer_trims_once_per_finished_burst() -> None:
    produced = {"s": 0}
    trims: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trim_after_bursts(
            lambda: produced, check_every=0.02, burst_frames=500,
            trim=lambda: trims.append(1),  # type: ignore[func-returns-value]
        ))
        await trio.sleep(0.2)
        assert trims == []
        produced["s"] = 800
        with trio.fail_after(5):
            while not trims:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # ten more quiet checks
        assert trims == [1]
        nursery.cancel_scope.cancel()


async def test_without_malloc_trim_the_trimmer_returns_at_once() -> None:
    with trio.fail_after(1):
        await trim_after_bursts(dict, check_every=0.01, burst_frames=1, trim=None)


@pytest.fixture
async def trimming_daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    config = daemon_config(tmp_path, allocator_trim=AllocatorTrim(check_every=0.3,
                                                                  burst_frames=300))
    async for running in running_daemon(nursery, config):
        yield running


async def test_the_daemon_trims_after_a_burst_of_real_output(
    trimming_daemon: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kallichore_trio.memory")
    session_id = await trimming_daemon.create()
    assert (await trimming_daemon.start(session_id)).status_code == 200

    def trimmed() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "kallichore_trio.memory"
                and "trimmed the allocator" in r.getMessage()]

    async with aconnect_ws(f"{trimming_daemon.ws_base}/sessions/{session_id}/channels",
                           trimming_daemon.client) as ws:
        await trio.sleep(1.0)  # start-up frames alone are not a burst
        assert trimmed() == []
        msg_id = uuid.uuid4().hex
        code = "for i in range(400): print(i, flush=True)"
        await ws.send_text(json.dumps(execute_request(code, msg_id)))
        frames = await collect_until_done(ws, msg_id)
        assert sum(f["header"]["msg_type"] == "stream" for f in frames if "header" in f) >= 300
        with trio.fail_after(10):
            while not trimmed():
                await trio.sleep(0.1)
    assert "RSS" in trimmed()[0].getMessage()
