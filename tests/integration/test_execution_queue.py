"""The execution queue with a real ipykernel (docs/protocol.md §6.5)."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.helpers import (
    Channel,
    RunningDaemon,
    is_reply_to,
    kernel_event,
    open_channel,
    session_json,
    stream_text,
)

QUEUED = [
    "x = 1; print(f'Queued First: {x}')",
    "y = 2; print(f'Queued Second: {y}')",
    "z = 3; print(f'Queued Third: {z}')",
    "print(f'Queued Fourth: {x + y + z}')",
]


def waiting_cell(flag: Path) -> str:
    """A cell that runs until the test creates `flag` (no race with a timer)."""
    return (f"import os, time\nprint('Starting long task', flush=True)\n"
            f"while not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
            "print('Long task finished')")


async def queue_behind_a_running_cell(
    daemon: RunningDaemon, channel: Channel, session_id: str, flag: Path, codes: list[str]
) -> tuple[str, list[str]]:
    long_id = await channel.execute(waiting_cell(flag))
    await channel.wait_for(lambda f: "Starting long task" in stream_text([f], long_id))
    queued = [await channel.execute(code) for code in codes]
    with trio.fail_after(30):
        while not all(
            any(kernel_event(f, "executionQueued") == q for f in channel.frames) for q in queued
        ):
            await channel.receive()
    queue = (await session_json(daemon, session_id))["execution_queue"]
    assert queue["active"]["header"]["msg_id"] == long_id
    assert queue["length"] == len(codes)
    assert [m["header"]["msg_id"] for m in queue["pending"]] == queued
    assert all(m["header"]["msg_type"] == "execute_request" for m in queue["pending"])
    return long_id, queued


async def test_execution_queue_holds_releases_in_order_and_is_visible(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    session_id = await daemon.create()
    assert (await daemon.start(session_id)).status_code == 200
    flag = tmp_path / "go"
    async with open_channel(daemon, session_id) as channel:
        long_id, queued = await queue_behind_a_running_cell(
            daemon, channel, session_id, flag, QUEUED)
        # Nothing queued has reached the kernel yet.
        assert not any(is_reply_to(f, q, "execute_reply") for f in channel.frames for q in queued)
        flag.touch()
        await channel.wait_done(queued[-1])
    text = "".join(stream_text(channel.frames, m) for m in (long_id, *queued))
    assert text == (
        "Starting long task\nLong task finished\n"
        "Queued First: 1\nQueued Second: 2\nQueued Third: 3\nQueued Fourth: 6\n")
    replies = [f["parent_header"]["msg_id"] for f in channel.frames
               if f.get("kind") == "jupyter" and f["header"]["msg_type"] == "execute_reply"]
    assert replies == [long_id, *queued]
    assert (await session_json(daemon, session_id))["execution_queue"] == {
        "length": 0, "pending": []}


async def test_interrupt_clears_the_execution_queue(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    session_id = await daemon.create()
    assert (await daemon.start(session_id)).status_code == 200
    async with open_channel(daemon, session_id) as channel:
        long_id, queued = await queue_behind_a_running_cell(
            daemon, channel, session_id, tmp_path / "never", QUEUED[:2])
        assert (await daemon.client.post(f"/sessions/{session_id}/interrupt")).status_code == 200
        frames = await channel.wait_done(long_id)
        reply = next(f for f in frames if is_reply_to(f, long_id, "execute_reply"))
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert (await session_json(daemon, session_id))["execution_queue"] == {
            "length": 0, "pending": []}
        # The next request runs at once; the dropped ones never ran.
        after = await channel.execute("print('after interrupt')")
        await channel.wait_done(after)
    assert not any(is_reply_to(f, q, "execute_reply") for f in channel.frames for q in queued)
    assert "Queued" not in stream_text(channel.frames)
    assert stream_text(channel.frames, after) == "after interrupt\n"
