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
