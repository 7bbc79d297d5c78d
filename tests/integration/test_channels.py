"""The channels WebSocket: eviction, buffering across clients, events from the kernel side."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from tests.helpers import (
    RunningDaemon,
    daemon_config,
    is_reply_to,
    is_status,
    kernel_event,
    mini_argv,
    open_channel,
    running_daemon,
    session_json,
    stream_text,
    wait_status,
)

EVICTED = {"kind": "kernel", "clientDisconnected": "Another client is connecting to this session."}


async def started(daemon: RunningDaemon, argv: list[str] | None = None) -> str:
    session_id = await daemon.create(argv)
    response = await daemon.start(session_id)
    assert response.status_code == 200, response.text
    return session_id


async def test_second_client_evicts_the_first_with_clientDisconnected(
    daemon: RunningDaemon,
) -> None:
    session_id = await started(daemon, mini_argv("normal"))
    async with open_channel(daemon, session_id) as first:
        await first.wait_for(lambda f: is_status(f, "idle", "kernel_info_reply"))
        async with open_channel(daemon, session_id) as second:
            frames = await first.drain_until_closed()
            assert frames == [EVICTED]
            msg_id = await second.execute("0")
            await second.wait_done(msg_id)
            assert (await session_json(daemon, session_id))["connected"] is True


async def test_frames_while_disconnected_are_delivered_to_the_next_client(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    session_id = await started(daemon)
    flag = tmp_path / "go"
    code = (f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
            "print('while away')")
    async with open_channel(daemon, session_id) as first:
        msg_id = await first.execute(code)
        await first.wait_for(lambda f: is_status(f, "busy", "execute_request"))
    with trio.fail_after(10):
        while (await session_json(daemon, session_id))["connected"]:
            await trio.sleep(0.02)
    flag.touch()
    with trio.fail_after(30):
        while (info := await session_json(daemon, session_id))["status"] != "idle" or (
            "active" in info["execution_queue"]
        ):
            await trio.sleep(0.05)
    async with open_channel(daemon, session_id) as second:
        frames = await second.wait_done(msg_id)
    assert stream_text(frames, msg_id) == "while away\n"
    assert any(is_reply_to(f, msg_id, "execute_reply") for f in frames)
    assert not any(is_status(f, "idle", "kernel_info_reply") for f in frames)


async def test_disconnect_in_a_burst_loses_and_duplicates_nothing(daemon: RunningDaemon) -> None:
    session_id = await started(daemon)
    async with open_channel(daemon, session_id) as first:
        msg_id = await first.execute("for i in range(3000): print(i, flush=True)")
        await first.wait_for(lambda f: "500\n" in stream_text([f], msg_id))
        # The first client stops reading; a second one connects and evicts it.
        async with open_channel(daemon, session_id) as second, trio.open_nursery() as nursery:
            nursery.start_soon(first.drain_until_closed)
            await second.wait_done(msg_id, timeout=60)
    assert first.frames[-1] == EVICTED
    assert not any(f == EVICTED for f in second.frames)
    lines = (stream_text(first.frames, msg_id) + stream_text(second.frames, msg_id)).splitlines()
    assert lines == [str(i) for i in range(3000)]


async def test_client_messages_sent_before_start_reach_the_kernel(daemon: RunningDaemon) -> None:
    session_id = await daemon.create()
    async with open_channel(daemon, session_id) as channel:
        msg_id = await channel.execute("print('held until started')")
        assert (await daemon.start(session_id)).status_code == 200
        frames = await channel.wait_done(msg_id)
    assert stream_text(frames, msg_id) == "held until started\n"


async def test_working_directory_change_emits_workingDirChanged(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    session_id = await started(daemon)
    target = str(tmp_path.resolve())
    async with open_channel(daemon, session_id) as channel:
        msg_id = await channel.execute(f"import os; os.chdir({target!r})")
        frames = await channel.wait_done(msg_id)
        changed = [i for i, f in enumerate(frames) if kernel_event(f, "workingDirChanged")]
        assert [frames[i]["workingDirChanged"] for i in changed] == [target]
        idle_event = next(
            i for i, f in enumerate(frames) if is_status(f, "idle", "execute_request"))
        assert changed[0] == idle_event + 1
        assert (await session_json(daemon, session_id))["working_directory"] == target
        # No change, no event.
        msg_id = await channel.execute("x = 1")
        frames = await channel.wait_done(msg_id)
        assert not any(kernel_event(f, "workingDirChanged") for f in frames)


async def test_kernel_output_lines_become_output_events(daemon: RunningDaemon) -> None:
    session_id = await started(daemon)
    async with open_channel(daemon, session_id) as channel:
        msg_id = await channel.execute(
            "import os; os.write(1, b'to stdout\\nsecond\\n'); os.write(2, b'to stderr\\n')")
        await channel.wait_done(msg_id)
        want = [["stdout", "to stdout\n"], ["stdout", "second\n"], ["stderr", "to stderr\n"]]
        with trio.fail_after(10):
            while not all(w in [kernel_event(f, "output") for f in channel.frames] for w in want):
                await channel.receive()
    outputs = [e for f in channel.frames if (e := kernel_event(f, "output"))]
    assert outputs.index(want[0]) < outputs.index(want[1])


@pytest.fixture
async def quick_heartbeat_daemon(
    nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[RunningDaemon]:
    config = daemon_config(tmp_path)
    timeouts = attrs.evolve(config.timeouts, heartbeat_reply=0.5, heartbeat_period=0.2)
    async for running in running_daemon(nursery, attrs.evolve(config, timeouts=timeouts)):
        yield running


async def test_heartbeat_loss_marks_offline_and_recovery_restores(
    quick_heartbeat_daemon: RunningDaemon,
) -> None:
    daemon = quick_heartbeat_daemon
    session_id = await started(daemon, mini_argv("hb_pause"))
    async with open_channel(daemon, session_id) as channel:
        await channel.execute("3")  # the mini kernel stops echoing heartbeats for 3 s
        await channel.wait_for(lambda f: is_status(f, "offline", "lost heartbeat"))
        assert (await session_json(daemon, session_id))["status"] == "offline"
        await channel.wait_for(
            lambda f: is_status(f, "idle", "heartbeat detected after offline"))
    await wait_status(daemon, session_id, "idle")
    statuses = [e["status"] for f in channel.frames if (e := kernel_event(f, "status"))]
    assert statuses[-2:] == ["offline", "idle"]


