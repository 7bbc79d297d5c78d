"""The vertical slice: daemon, real ipykernel, HTTP and a WebSocket client."""

from __future__ import annotations

import json
import uuid

import psutil
import trio
from httpx_ws import aconnect_ws

from tests.helpers import RunningDaemon, collect_until_done, execute_request, is_idle_for


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
