"""The vertical slice: daemon, real ipykernel, HTTP and a WebSocket client."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psutil
import trio
from httpx_ws import aconnect_ws

from tests.conftest import RunningDaemon


def execute_request(code: str, msg_id: str | None = None) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": msg_id or uuid.uuid4().hex,
            "msg_type": "execute_request",
            "session": "client-session",
            "username": "someone",
            "date": "2026-01-01T00:00:00.000Z",
            "version": "5.3",
        },
        "parent_header": None,
        "channel": "shell",
        "content": {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "metadata": {},
        "buffers": [],
    }


def is_reply_to(frame: dict, msg_id: str, msg_type: str) -> bool:
    return (
        frame.get("kind") == "jupyter"
        and frame["header"]["msg_type"] == msg_type
        and (frame["parent_header"] or {}).get("msg_id") == msg_id
    )


def is_idle_for(frame: dict, msg_id: str) -> bool:
    return is_reply_to(frame, msg_id, "status") and frame["content"]["execution_state"] == "idle"


async def collect_until_done(ws: Any, msg_id: str, timeout: float = 30) -> list[dict]:
    """Frames until both the execute_reply and the idle status for `msg_id` have arrived
    (they come on different sockets, so in either order)."""
    frames: list[dict] = []
    with trio.fail_after(timeout):
        while not (
            any(is_idle_for(f, msg_id) for f in frames)
            and any(is_reply_to(f, msg_id, "execute_reply") for f in frames)
        ):
            frames.append(json.loads(await ws.receive_text()))
    return frames


async def test_print_6_times_7_through_the_daemon(daemon: RunningDaemon) -> None:
    session_id = await daemon.create()
    response = await daemon.start(session_id)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"
    assert response.json()["language_info"]["name"] == "python"
    pid = (await daemon.client.get(f"/sessions/{session_id}")).json()["process_id"]
    assert psutil.pid_exists(pid)

    async with aconnect_ws(f"{daemon.ws_base}/sessions/{session_id}/channels",
                           daemon.client) as ws:
        msg_id = uuid.uuid4().hex
        await ws.send_text(json.dumps(execute_request("print(6*7)", msg_id)))
        frames = await collect_until_done(ws, msg_id)

    assert all(f["kind"] in ("jupyter", "kernel") for f in frames)
    kinds = [
        ("kernel", "status", f["status"]["status"]) if f["kind"] == "kernel" and "status" in f
        else (f["kind"], f.get("header", {}).get("msg_type"), f.get("channel"))
        for f in frames
    ]
    assert ("kernel", "status", "busy") in kinds
    streams = [f for f in frames if f["kind"] == "jupyter" and f["header"]["msg_type"] == "stream"]
    assert "".join(s["content"]["text"] for s in streams) == "42\n"
    assert all(s["parent_header"]["msg_id"] == msg_id for s in streams)
    replies = [f for f in frames if f.get("header", {}).get("msg_type") == "execute_reply"]
    assert len(replies) == 1 and replies[0]["channel"] == "shell"
    assert replies[0]["content"]["status"] == "ok"
    assert replies[0]["parent_header"] == {"msg_id": msg_id, "msg_type": "execute_request"}
    busy = kinds.index(("kernel", "status", "busy"))
    stream = next(i for i, f in enumerate(frames) if f in streams)
    reply = frames.index(replies[0])
    assert busy < stream and busy < reply
    idle = next(i for i, f in enumerate(frames) if is_idle_for(f, msg_id))
    assert stream < idle
    assert ("kernel", "status", "idle") in kinds[busy:]

    response = await daemon.client.post("/shutdown")
    assert response.status_code == 200 and response.json() is None
    with trio.fail_after(20):
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            await trio.sleep(0.1)
