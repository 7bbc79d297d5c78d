"""The port race: a kernel that finds a port we picked already taken is started again on fresh
ports, promptly, without its failed attempts showing as exits (DESIGN: kernel port race)."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from tests.helpers import (
    KERNELS,
    RunningDaemon,
    kernel_event,
    open_channel,
    session_json,
    stream_text,
)

#: Far longer than a start takes, so a conflict noticed only by timing out fails the test.
NEVER = 600


def squatter_argv(counter: Path, squat_times: int, *extra: str) -> list[str]:
    return [sys.executable, str(KERNELS / "port_squatter.py"), str(counter), str(squat_times),
            "{connection_file}", *extra]


async def test_a_taken_port_is_retried_on_fresh_ports(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    counter = tmp_path / "launches"
    session_id = await daemon.create(squatter_argv(counter, 1), connection_timeout=NEVER)
    async with open_channel(daemon, session_id) as channel:
        with trio.fail_after(120):
            response = await daemon.start(session_id)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"
        assert counter.read_text() == "2"
        msg_id = await channel.execute("print(6 * 7)")
        frames = await channel.wait_done(msg_id)
        assert stream_text(frames, msg_id) == "42\n"
    # The failed attempt's exit was never reported: clients saw one start, not a crash.
    assert not [f for f in channel.frames if kernel_event(f, "exited") is not None]
    info = await session_json(daemon, session_id)
    assert info["status"] == "idle"


async def test_a_port_taken_every_time_fails_after_three_attempts(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    counter = tmp_path / "launches"
    session_id = await daemon.create(squatter_argv(counter, 99), connection_timeout=NEVER)
    with trio.fail_after(180):
        response = await daemon.start(session_id)
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["code"] == "KS-6"
    assert body["error"]["message"] == (
        "Failed to connect to session's ZeroMQ sockets: "
        "the kernel could not bind the ports it was given (address already in use)")
    assert "Address already in use" in body["output"]
    assert counter.read_text() == "3"
    info = await session_json(daemon, session_id)
    assert info["status"] == "exited" and "process_id" not in info


async def test_a_kernel_that_exits_on_a_taken_port_is_retried(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    counter = tmp_path / "launches"
    session_id = await daemon.create(squatter_argv(counter, 99, "exit"), connection_timeout=NEVER)
    with trio.fail_after(120):
        response = await daemon.start(session_id)
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["code"] == "KS-6"
    assert body["exit_code"] == 1
    assert counter.read_text() == "3"
