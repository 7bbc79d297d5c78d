"""A prompt for input (ipykernel's `input()`) reaches the client and its answer the kernel.

The kernel addresses its input_request with the shell request's routing prefix on its stdin
ROUTER (docs/architecture.md); tests/integration/test_r_kernel.py checks the same with IRkernel.
"""

from __future__ import annotations

import uuid

from tests.helpers import (
    RunningDaemon,
    execute_request,
    is_reply_to,
    mini_argv,
    open_channel,
    stream_text,
)


async def test_input_request_reaches_the_client_and_the_reply_the_kernel(
    daemon: RunningDaemon,
) -> None:
    session_id = await daemon.create()
    assert (await daemon.start(session_id)).status_code == 200
    async with open_channel(daemon, session_id) as channel:
        message = execute_request("print(input('Your name? ').upper())")
        message["content"]["allow_stdin"] = True  # as Positron sends it
        msg_id = message["header"]["msg_id"]
        await channel.send(message)
        request = await channel.wait_for(
            lambda f: f.get("kind") == "jupyter" and f["channel"] == "stdin"
            and f["header"]["msg_type"] == "input_request"
            and f["parent_header"]["msg_id"] == msg_id)
        assert request["content"]["prompt"] == "Your name? "
        await channel.send({
            "header": {"msg_id": uuid.uuid4().hex, "msg_type": "input_reply"},
            "parent_header": request["header"], "channel": "stdin",
            "content": {"value": "ada"}, "metadata": {}, "buffers": [],
        })
        frames = await channel.wait_done(msg_id)
        assert stream_text(frames, msg_id) == "ADA\n"
        reply = next(f for f in frames if is_reply_to(f, msg_id, "execute_reply"))
        assert reply["content"]["status"] == "ok"


async def test_the_first_prompt_reaches_a_client_that_asks_at_once(daemon: RunningDaemon) -> None:
    """The kernel speaks first on stdin, and its ROUTER drops a prompt addressed to a client
    whose connection has not completed its handshake. Our stdin socket connects while the
    kernel is still binding and retries on its own timer, so a kernel that answers kernel_info
    before binding stdin (this one binds it half a second later, or when the first request
    comes) lost the prompt of a cell run right after start, and the cell hung: 1 fresh
    ipykernel in 6 in the full suite, IRkernel's readline too. A start now waits for stdin."""
    session_id = await daemon.create(mini_argv("late_stdin"))
    assert (await daemon.start(session_id)).status_code == 200
    async with open_channel(daemon, session_id) as channel:
        msg_id = await channel.execute("ask")
        request = await channel.wait_for(
            lambda f: f.get("kind") == "jupyter" and f["channel"] == "stdin"
            and f["header"]["msg_type"] == "input_request", timeout=15)
        await channel.send({
            "header": {"msg_id": uuid.uuid4().hex, "msg_type": "input_reply"},
            "parent_header": request["header"], "channel": "stdin",
            "content": {"value": "ada"}, "metadata": {}, "buffers": [],
        })
        frames = await channel.wait_done(msg_id)
        assert stream_text(frames, msg_id) == "got ada\n"
