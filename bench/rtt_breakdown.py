"""Where a round trip's time goes inside the daemon: timestamps along the path of `1+1`.

Runs the daemon in this process with one ipykernel session and a raw WebSocket client, wraps
the functions a request and its idle status pass through so that each records when it ran,
and prints the median of each leg over 100 round trips (after 20 warm-up runs). The client
shares the daemon's thread, so read the output as a breakdown, not as absolute costs.

Usage: .venv/bin/python bench/rtt_breakdown.py
"""

from __future__ import annotations

import functools
import inspect
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kallichore_trio.app import run_daemon
from kallichore_trio.session import session
from kallichore_trio.transport import websocket, zmq_trio
from tests.helpers import RawWebSocket, daemon_config, execute_request, new_session_body

marks: dict[str, float] = {}


def mark(owner: Any, name: str, label: str,
         when: Callable[..., bool] = lambda *args, **kwargs: True) -> None:
    """Wrap owner.name so that the first call of a round trip passing `when` records `label`."""
    original = getattr(owner, name)

    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            if when(*args, result=result):
                marks.setdefault(label, time.perf_counter())
            return result
    else:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if when(*args, result=result):
                marks.setdefault(label, time.perf_counter())
            return result

    setattr(owner, name, wrapper)


def is_idle(_session: Any, msg: Any, channel: str, **_: Any) -> bool:
    return channel == "iopub" and msg.msg_type == "status" and b'"idle"' in msg.content


mark(websocket.WsprotoConnection, "receive_text", "reader has the frame")
mark(session.Session, "deliver", "delivered to the kernel")
mark(zmq_trio.TrioSocket, "send", "handed to zmq", lambda sock, *_, **__: sock.name == "shell")
mark(session.Session, "on_kernel_message", "idle status parsed", is_idle)

LEGS = ["reader has the frame", "delivered to the kernel", "handed to zmq",
        "idle status parsed", "client has the idle"]


def is_idle_frame(frame: dict[str, Any], msg_id: str) -> bool:
    return (frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "status"
            and (frame.get("parent_header") or {}).get("msg_id") == msg_id
            and frame["content"]["execution_state"] == "idle")


async def main() -> None:
    config = daemon_config(Path(tempfile.mkdtemp()))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(run_daemon, config)
        headers = {"Authorization": f"Bearer {config.token}"}
        async with httpx.AsyncClient(base_url=address.base_path, headers=headers,
                                     timeout=60) as http:
            await http.put("/sessions", json=new_session_body("rtt"))
            await http.post("/sessions/rtt/start")
            stream = await trio.open_tcp_stream("127.0.0.1", address.port)
            ws = await RawWebSocket.connect(stream, "/sessions/rtt/channels",
                                            token=config.token)
            legs: dict[str, list[float]] = {leg: [] for leg in LEGS}
            for run in range(120):
                marks.clear()
                msg_id = uuid.uuid4().hex
                start = time.perf_counter()
                await ws.send_text(json.dumps(execute_request("1+1", msg_id)))
                while not is_idle_frame(json.loads(await ws.receive_text()), msg_id):
                    pass
                marks["client has the idle"] = time.perf_counter()
                if run >= 20 and all(leg in marks for leg in LEGS):
                    previous = start
                    for leg in LEGS:
                        legs[leg].append(marks[leg] - previous)
                        previous = marks[leg]
                await trio.sleep(0.01)
            total = 0.0
            for leg, times in legs.items():
                median = statistics.median(times) * 1e3
                total += median
                print(f"{'-> ' + leg:28s} {median:7.3f} ms")
            print(f"{'sum of medians':28s} {total:7.3f} ms")
            await http.post("/shutdown")


if __name__ == "__main__":
    trio.run(main)
