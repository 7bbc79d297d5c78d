"""Helpers for the lifecycle tests: a channels client that waits on frames, test kernels."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psutil
import trio
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws

from tests.conftest import KERNELS, RunningDaemon
from tests.test_end_to_end import execute_request, is_idle_for, is_reply_to

__all__ = [
    "Channel",
    "execute_request",
    "is_idle_for",
    "is_reply_to",
    "mini_argv",
    "open_channel",
    "process_gone",
    "wait_process_gone",
]

Frame = dict[str, Any]


def mini_argv(mode: str) -> list[str]:
    return [sys.executable, str(KERNELS / "mini_kernel.py"), "{connection_file}", mode]


def jupyter_message(msg_type: str, content: dict[str, Any], channel: str = "shell",
                    msg_id: str | None = None) -> dict[str, Any]:
    return {
        "header": {"msg_id": msg_id or uuid.uuid4().hex, "msg_type": msg_type},
        "parent_header": None,
        "channel": channel,
        "content": content,
        "metadata": {},
        "buffers": [],
    }


class Channel:
    """A channels WebSocket that keeps every frame it received."""

    def __init__(self, ws: AsyncWebSocketSession) -> None:
        self.ws = ws
        self.frames: list[Frame] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(message))

    async def execute(self, code: str) -> str:
        msg_id = uuid.uuid4().hex
        await self.send(execute_request(code, msg_id))
        return msg_id

    async def receive(self) -> Frame:
        frame = json.loads(await self.ws.receive_text())
        self.frames.append(frame)
        return frame

    async def wait_for(self, predicate: Callable[[Frame], bool], timeout: float = 30) -> Frame:
        """The first frame (from now on) satisfying `predicate`."""
        with trio.fail_after(timeout):
            while True:
                frame = await self.receive()
                if predicate(frame):
                    return frame

    async def wait_done(self, msg_id: str, timeout: float = 30) -> list[Frame]:
        """Frames from now until both execute_reply and idle of `msg_id` arrived."""
        start = len(self.frames)
        with trio.fail_after(timeout):
            while not (
                any(is_idle_for(f, msg_id) for f in self.frames[start:])
                and any(is_reply_to(f, msg_id, "execute_reply") for f in self.frames[start:])
            ):
                await self.receive()
        return self.frames[start:]

    async def drain_until_closed(self, timeout: float = 30) -> list[Frame]:
        start = len(self.frames)
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.receive()
            except WebSocketDisconnect:
                pass
        return self.frames[start:]


@asynccontextmanager
async def open_channel(daemon: RunningDaemon, session_id: str) -> AsyncIterator[Channel]:
    async with aconnect_ws(f"{daemon.ws_base}/sessions/{session_id}/channels",
                           daemon.client) as ws:
        yield Channel(ws)


def kernel_event(frame: Frame, key: str) -> Any:
    return frame.get(key) if frame.get("kind") == "kernel" else None


def is_status(frame: Frame, status: str, reason: object = object) -> bool:
    event = kernel_event(frame, "status")
    if not event or event["status"] != status:
        return False
    return reason is object or event["reason"] == reason


def stream_text(frames: list[Frame], parent: str | None = None) -> str:
    return "".join(
        f["content"]["text"] for f in frames
        if f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream"
        and (parent is None or (f["parent_header"] or {}).get("msg_id") == parent)
    )


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_process_gone(pid: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while not process_gone(pid):
            await trio.sleep(0.05)


async def session_json(daemon: RunningDaemon, session_id: str) -> dict[str, Any]:
    response = await daemon.client.get(f"/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def wait_status(daemon: RunningDaemon, session_id: str, status: str,
                      timeout: float = 20) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while (body := await session_json(daemon, session_id))["status"] != status:
            await trio.sleep(0.05)
    return body
