"""Execution history against a real ipykernel: GET /sessions/{id}/history and the `history`
of sessions (docs/differences.md, "Execute and history")."""

from __future__ import annotations

import time
from typing import Any

from kallichore_trio import models
from tests.helpers import (
    RunningDaemon,
    execute_ok,
    execute_request,
    open_channel,
    session_json,
    started,
)


async def history(daemon: RunningDaemon, session_id: str) -> list[dict[str, Any]]:
    response = await daemon.client.get(f"/sessions/{session_id}/history")
    assert response.status_code == 200, response.text
    entries = response.json()
    for entry in entries:  # each one a historyEntry, exactly
        assert models.dump(models.converter.structure(entry, models.HistoryEntry)) == entry
    return entries


def request(code: str, *, silent: bool = False, **metadata: Any) -> dict[str, Any]:
    message = execute_request(code)
    message["content"]["silent"] = silent
    message["metadata"] = metadata
    return message


async def test_websocket_requests_are_recorded_with_attribution(daemon: RunningDaemon) -> None:
    session_id = await started(daemon)
    before = int(time.time() * 1000)
    async with open_channel(daemon, session_id) as channel:
        attributed = request("print('from an agent')", attribution={
            "source": "agent", "agent_name": "claude", "attributionSource": "x"}, cellId="c1")
        await channel.send(attributed)
        await channel.wait_done(attributed["header"]["msg_id"])
        silent = request("print('not recorded')", silent=True)
        await channel.send(silent)
        await channel.wait_done(silent["header"]["msg_id"])
        failing = request("x = 1\nundefined_name")
        await channel.send(failing)
        await channel.wait_done(failing["header"]["msg_id"])
    after = int(time.time() * 1000)
    first, second = await history(daemon, session_id)
    assert before <= first["timestamp"] <= second["timestamp"] <= after
    assert {k: v for k, v in first.items() if k != "timestamp"} == {
        "input": "print('from an agent')", "output": "from an agent\n", "source": "agent",
        "agent": "claude", "truncated": False}
    assert (second["input"], second["output"], second["truncated"]) == (
        "x = 1\nundefined_name", "", False)
    assert "source" not in second and "agent" not in second
    error = second["error"]
    assert (error["name"], error["message"]) == ("NameError",
                                                 "name 'undefined_name' is not defined")
    assert error["traceback"] and "NameError" in error["traceback"][-1]


async def test_execute_is_recorded_unless_silent(daemon: RunningDaemon) -> None:
    session_id = await started(daemon)
    await execute_ok(daemon, session_id, "print('a')\n'b'")
    await execute_ok(daemon, session_id, "print('hidden')", silent=True)
    await execute_ok(daemon, session_id,
                     "from IPython.display import Image, display\n"
                     "display(Image(data=b'\\x89PNG\\r\\n\\x1a\\n', format='png'))")
    entries = await history(daemon, session_id)
    assert [(e["input"].splitlines()[0], e["output"]) for e in entries] == [
        ("print('a')", "a\n'b'\n"),
        ("from IPython.display import Image, display", "<IPython.core.display.Image object>\n"),
    ]


async def test_large_input_and_output_are_clipped_keeping_head_and_tail(
    daemon: RunningDaemon,
) -> None:
    session_id = await started(daemon)
    code = "# " + "c" * 5000 + "\nfor i in range(2000): print(f'{i:05d}')"
    await execute_ok(daemon, session_id, code)
    [entry] = await history(daemon, session_id)
    assert entry["truncated"] is True
    text = "".join(f"{i:05d}\n" for i in range(2000))
    # All 12,000 bytes were kept (under the reply window), so the clip is exact.
    assert entry["output"] == text[:2032] + "\n[... 7935 bytes omitted ...]\n" + text[-2033:]
    assert entry["input"].startswith("# ccc") and entry["input"].endswith("print(f'{i:05d}')")
    assert len(entry["input"].encode()) <= 4096 and "bytes omitted ...]" in entry["input"]


async def test_sessions_show_the_last_three_and_history_keeps_a_hundred(
    daemon: RunningDaemon,
) -> None:
    response = await daemon.client.get("/sessions/nope/history")
    assert (response.status_code, response.content) == (404, b"")
    session_id = await started(daemon)
    assert (await session_json(daemon, session_id))["history"] == []
    for i in range(102):
        await execute_ok(daemon, session_id, f"print({i})")
    entries = await history(daemon, session_id)
    assert [e["output"] for e in entries] == [f"{i}\n" for i in range(2, 102)]
    shown = (await session_json(daemon, session_id))["history"]
    assert [e["input"] for e in shown] == ["print(99)", "print(100)", "print(101)"]
    listed = (await daemon.client.get("/sessions")).json()["sessions"]
    assert [s["history"] for s in listed if s["session_id"] == session_id] == [shown]
