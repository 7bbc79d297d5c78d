"""R's kernel (IRkernel) through the daemon: start, execute, error, readline, interrupt, restart.

IRkernel differs from ipykernel where it matters to a supervisor: it answers no heartbeat while
busy, honours only SIGINT for interrupts (so the sessions use `interrupt_mode: "signal"`), and
its `readline` sends an input_request on stdin addressed with the routing prefix of the shell
request, which reaches us only because all our DEALERs share one identity (docs/architecture.md).

Skipped where R or IRkernel is not installed (CI installs `r-cran-irkernel`, see .ci/run).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from typing import Any

import pytest
import trio

from tests.helpers import (
    Channel,
    RunningDaemon,
    execute_request,
    is_reply_to,
    is_status,
    kernel_event,
    open_channel,
    session_json,
    stream_text,
    wait_process_gone,
)


def _irkernel_missing() -> str | None:
    if shutil.which("R") is None:
        return "R is not installed (no `R` on PATH)"
    try:
        probe = subprocess.run(
            ["Rscript", "-e", "library(IRkernel)"], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`Rscript -e 'library(IRkernel)'` could not run: {exc}"
    if probe.returncode != 0:
        return "IRkernel is not installed for R (`library(IRkernel)` failed)"
    return None


_MISSING = _irkernel_missing()
if _MISSING is not None:
    pytest.skip(_MISSING, allow_module_level=True)

#: The argv of IRkernel's kernelspec (/usr/share/jupyter/kernels/ir/kernel.json).
R_ARGV = ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]


async def r_session(daemon: RunningDaemon) -> str:
    session_id = await daemon.create(
        R_ARGV, display_name="R", language="R", interrupt_mode="signal",
        input_prompt="> ", continuation_prompt="+ ",
    )
    response = await daemon.start(session_id)
    assert response.status_code == 200, response.text
    return session_id


def r_execute(code: str, *, allow_stdin: bool = True) -> dict[str, Any]:
    """An execute_request as Positron sends it: with `allow_stdin: true`."""
    message = execute_request(code, uuid.uuid4().hex)
    message["content"]["allow_stdin"] = allow_stdin
    return message


async def run_cell(channel: Channel, code: str, timeout: float = 30) -> tuple[str, list[dict]]:
    message = r_execute(code)
    await channel.send(message)
    msg_id = message["header"]["msg_id"]
    return msg_id, await channel.wait_done(msg_id, timeout)


def execute_reply(frames: list[dict], msg_id: str) -> dict[str, Any]:
    return next(f for f in frames if is_reply_to(f, msg_id, "execute_reply"))


def is_input_request_for(frame: dict, msg_id: str) -> bool:
    return (
        frame.get("kind") == "jupyter"
        and frame["channel"] == "stdin"
        and frame["header"]["msg_type"] == "input_request"
        and (frame["parent_header"] or {}).get("msg_id") == msg_id
    )


async def test_r_kernel_starts_and_executes(daemon: RunningDaemon) -> None:
    session_id = await r_session(daemon)
    body = await session_json(daemon, session_id)
    assert body["status"] == "idle" and body["language"] == "R"
    async with open_channel(daemon, session_id) as channel:
        msg_id, frames = await run_cell(channel, "cat(6*7)")
        assert stream_text(frames, msg_id) == "42"
        assert execute_reply(frames, msg_id)["content"]["status"] == "ok"


async def test_r_error_is_an_error_reply_with_its_message(daemon: RunningDaemon) -> None:
    session_id = await r_session(daemon)
    async with open_channel(daemon, session_id) as channel:
        msg_id, frames = await run_cell(channel, 'stop("boom")')
        content = execute_reply(frames, msg_id)["content"]
        assert content["status"] == "error"
        assert "boom" in content["evalue"]
        errors = [f for f in frames if f.get("kind") == "jupyter"
                  and f["header"]["msg_type"] == "error"]
        assert errors and "boom" in errors[0]["content"]["evalue"]


async def test_r_readline_goes_to_the_client_and_its_answer_to_r(daemon: RunningDaemon) -> None:
    session_id = await r_session(daemon)
    async with open_channel(daemon, session_id) as channel:
        message = r_execute('name <- readline("Your name? "); cat(toupper(name))')
        msg_id = message["header"]["msg_id"]
        await channel.send(message)
        request = await channel.wait_for(lambda f: is_input_request_for(f, msg_id))
        assert request["content"] == {"prompt": "Your name? ", "password": False}
        await channel.send({
            "header": {"msg_id": uuid.uuid4().hex, "msg_type": "input_reply"},
            "parent_header": request["header"],
            "channel": "stdin",
            "content": {"value": "ada"},
            "metadata": {},
            "buffers": [],
        })
        frames = await channel.wait_done(msg_id)
        assert stream_text(frames, msg_id) == "ADA"
        assert execute_reply(frames, msg_id)["content"]["status"] == "ok"


async def test_r_interrupt_stops_a_sleep_and_the_kernel_still_works(
    daemon: RunningDaemon,
) -> None:
    session_id = await r_session(daemon)
    pid = (await session_json(daemon, session_id))["process_id"]
    async with open_channel(daemon, session_id) as channel:
        message = r_execute('cat("sleeping\\n"); Sys.sleep(30); cat("woke up\\n")')
        msg_id = message["header"]["msg_id"]
        await channel.send(message)
        # The SIGINT must land inside the cell: between requests it can end R.
        await channel.wait_for(lambda f: stream_text([f], msg_id) == "sleeping\n")
        response = await daemon.client.post(f"/sessions/{session_id}/interrupt")
        assert response.status_code == 200, response.text
        frames = await channel.wait_done(msg_id, timeout=20)
        assert "woke up" not in stream_text(frames, msg_id)
        # IRkernel reports an interrupted cell as "abort" (not a Jupyter status, but its own).
        assert execute_reply(frames, msg_id)["content"]["status"] != "ok"
        after, frames = await run_cell(channel, "cat(6*7)")
        assert stream_text(frames, after) == "42"
    assert (await session_json(daemon, session_id))["process_id"] == pid


async def test_r_restart_gives_a_fresh_working_kernel(daemon: RunningDaemon) -> None:
    session_id = await r_session(daemon)
    old_pid = (await session_json(daemon, session_id))["process_id"]
    async with open_channel(daemon, session_id) as channel:
        _, frames = await run_cell(channel, "kept <- 1")
        result: dict[str, Any] = {}

        async def restart() -> None:
            result["response"] = await daemon.client.post(
                f"/sessions/{session_id}/restart", json={}, timeout=60)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart)
            await channel.wait_for(lambda f: kernel_event(f, "exited") is not None)
            await channel.wait_for(lambda f: is_status(f, "idle", "kernel_info_reply"))
        assert result["response"].status_code == 200, result["response"].text
        await wait_process_gone(old_pid)
        assert (await session_json(daemon, session_id))["process_id"] != old_pid
        msg_id, frames = await run_cell(channel, 'cat(exists("kept"), 6*7)')
        assert stream_text(frames, msg_id) == "FALSE 42"
        # stdin is routed to the new incarnation too.
        message = r_execute('cat(nchar(readline("? ")))')
        await channel.send(message)
        msg_id = message["header"]["msg_id"]
        request = await channel.wait_for(lambda f: is_input_request_for(f, msg_id))
        await channel.send({
            "header": {"msg_id": uuid.uuid4().hex, "msg_type": "input_reply"},
            "parent_header": request["header"], "channel": "stdin",
            "content": {"value": "four"}, "metadata": {}, "buffers": [],
        })
        frames = await channel.wait_done(msg_id)
        assert stream_text(frames, msg_id) == "4"
