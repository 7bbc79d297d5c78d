"""POST /sessions/{id}/execute against a real ipykernel (docs/differences.md, "Execute and
history")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from tests.helpers import (
    Channel,
    RunningDaemon,
    execute,
    execute_ok,
    execute_request,
    kernel_event,
    open_channel,
    started,
    stream_text,
    wait_status,
)


async def test_execute_returns_output_result_errors_and_displays(daemon: RunningDaemon) -> None:
    session_id = await started(daemon)
    body = await execute_ok(daemon, session_id, "print('hello')\n6 * 7")
    assert body["status"] == "ok" and body["execution_count"] >= 1
    assert body["output"] == [{"type": "stream", "stream_name": "stdout", "text": "hello\n"}]
    assert body["data"] == {"text/plain": "42"}

    body = await execute_ok(daemon, session_id, "import sys\nprint('x', file=sys.stderr)\n1/0")
    assert body["status"] == "error"
    assert body["output"][0] == {"type": "stream", "stream_name": "stderr", "text": "x\n"}
    error = body["output"][-1]
    assert (error["type"], error["error_name"], error["error_message"]) == (
        "error", "ZeroDivisionError", "division by zero")
    assert (body["error_name"], body["error_message"]) == ("ZeroDivisionError",
                                                           "division by zero")
    assert "ZeroDivisionError" in body["error_traceback"][-1]
    assert "data" not in body

    body = await execute_ok(daemon, session_id,
                            "from IPython.display import HTML, display\n"
                            "display(HTML('<b>bold</b>'))")
    [item] = body["output"]
    assert item["type"] == "display_data"
    assert item["data"]["text/html"] == "<b>bold</b>"
    assert "data" not in body

    # input() cannot be answered by anyone: it fails at once instead of hanging.
    body = await execute_ok(daemon, session_id, "input('name? ')")
    assert body["status"] == "error" and body["error_name"] == "StdinNotImplementedError"


async def test_a_timeout_interrupts_the_kernel_and_answers_408(daemon: RunningDaemon) -> None:
    session_id = await started(daemon)
    response = await execute(daemon, session_id, "import time\nwhile True: time.sleep(0.05)",
                             timeout_seconds=1)
    assert response.status_code == 408
    assert response.json()["code"] == "execution_timeout"
    # The interrupt ended the loop: the next execution runs (it would queue forever otherwise).
    body = await execute_ok(daemon, session_id, "print('after')", timeout_seconds=30)
    assert body["output"] == [{"type": "stream", "stream_name": "stdout", "text": "after\n"}]
    history = (await daemon.client.get(f"/sessions/{session_id}/history")).json()
    assert history[-2]["error"]["name"] == "KeyboardInterrupt"


async def test_errors_unknown_session_not_started_bad_body(daemon: RunningDaemon) -> None:
    response = await execute(daemon, "no-such-session", "1")
    assert (response.status_code, response.content) == (404, b"")
    session_id = await daemon.create()
    response = await execute(daemon, session_id, "1")
    assert response.status_code == 400
    assert response.json()["code"] == "session_not_ready"
    for bad in ({"code": 1}, {"code": "1", "timeout_seconds": 0},
                {"code": "1", "timeout_seconds": -3}, {"code": "1", "silent": "no"}):
        response = await daemon.client.post(f"/sessions/{session_id}/execute", json=bad)
        assert response.status_code == 400, bad
    async with httpx.AsyncClient(base_url=daemon.base) as anonymous:
        response = await anonymous.post(f"/sessions/{session_id}/execute", json={"code": "1"})
        assert response.status_code == 401


async def test_a_kernel_still_starting_is_waited_for(daemon: RunningDaemon) -> None:
    session_id = await daemon.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.start, session_id)
        await wait_status(daemon, session_id, "starting")
        body = await execute_ok(daemon, session_id, "print('ready')")
    assert body["output"] == [{"type": "stream", "stream_name": "stdout", "text": "ready\n"}]


async def test_a_kernel_that_exits_answers_channel_closed(daemon: RunningDaemon) -> None:
    session_id = await started(daemon)
    response = await execute(daemon, session_id, "import os\nos._exit(3)")
    assert response.status_code == 400
    assert response.json()["code"] == "channel_closed"
    response = await execute(daemon, session_id, "1")
    assert response.json()["code"] == "session_not_ready"


async def wait_queued(channel: Channel, count: int) -> list[str]:
    """The msg_ids of the next `count` executionQueued events."""
    queued: list[str] = []
    with trio.fail_after(30):
        while len(queued) < count:
            event = kernel_event(await channel.receive(), "executionQueued")
            if event:
                queued.append(event)
    return queued


async def test_execute_and_websocket_requests_queue_behind_each_other(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    session_id = await started(daemon)
    flag = tmp_path / "go"
    async with open_channel(daemon, session_id) as channel:
        first = await channel.execute(
            "import os, time\norder = ['first']\nprint('waiting', flush=True)\n"
            f"while not os.path.exists({str(flag)!r}): time.sleep(0.02)")
        await channel.wait_for(lambda f: "waiting" in stream_text([f], first))
        results: list[dict[str, Any]] = []

        async def over_http() -> None:
            results.append(await execute_ok(
                daemon, session_id, "order.append('execute')\nprint('from execute')"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(over_http)
            [via_http] = await wait_queued(channel, 1)  # /execute is queued behind `first`
            last = await channel.execute("order.append('last')")
            assert await wait_queued(channel, 1) == [last]
            flag.touch()
            await channel.wait_done(last)
        # The WebSocket client saw the /execute request's messages too.
        assert stream_text(channel.frames, via_http) == "from execute\n"
    assert results[0]["output"] == [
        {"type": "stream", "stream_name": "stdout", "text": "from execute\n"}]
    body = await execute_ok(daemon, session_id, "order")
    assert body["data"]["text/plain"] == "['first', 'execute', 'last']"


async def test_a_websocket_request_with_attribution_is_not_confused_with_execute(
    daemon: RunningDaemon,
) -> None:
    # A plain WebSocket request in flight while /execute runs: each gets its own output.
    session_id = await started(daemon)
    async with open_channel(daemon, session_id) as channel:
        request = execute_request("print('ws')")
        await channel.send(request)
        body = await execute_ok(daemon, session_id, "print('http')")
        await channel.wait_done(request["header"]["msg_id"])
    assert body["output"] == [{"type": "stream", "stream_name": "stdout", "text": "http\n"}]
    assert stream_text(channel.frames, request["header"]["msg_id"]) == "ws\n"
