"""The pure parts of the MCP server: workspaces, window frames, tool results, routes, the
stdio relay's choice of workspace, and the window broker's hand-over (docs/mcp.md)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import trio
from mcp import types

from kallichore_trio.mcp import frames
from kallichore_trio.mcp.address import Route, parse_route
from kallichore_trio.mcp.listener import origin_loopback
from kallichore_trio.mcp.stdio import NoTarget, Target, choose_target, deepest_folder_match
from kallichore_trio.mcp.tools import (
    RESULT_TEXT_BYTES,
    ToolFailure,
    execution_content,
    timeout_seconds,
)
from kallichore_trio.mcp.windows import CommandFailed, WindowBroker
from kallichore_trio.mcp.workspaces import Access, WorkspaceBook, mint_workspace_id


def test_workspace_ids_are_minted_from_the_display_name() -> None:
    assert mint_workspace_id("My Project (2)").startswith("my-project-2-")
    assert mint_workspace_id("???").startswith("workspace-")
    assert len(mint_workspace_id("x" * 300)) == 40 + 9


def test_register_keeps_a_supplied_token_and_refuses_malformed_ones() -> None:
    book = WorkspaceBook()
    kept = book.register(workspace_id="ws1", display_name="One", token="t" * 20)
    assert kept.token == "t" * 20
    again = book.register(workspace_id="ws1", display_name="One again", token=None)
    assert again is kept and again.token == "t" * 20 and again.display_name == "One again"
    minted = book.register(workspace_id=None, display_name="Two", token=None)
    assert minted.id.startswith("two-") and len(minted.token) >= 32
    with pytest.raises(ValueError, match="token"):
        book.register(workspace_id="ws3", display_name="x", token="short")
    with pytest.raises(ValueError, match="workspace_id"):
        book.register(workspace_id="../etc", display_name="x", token=None)
    assert "ws3" not in book.workspaces


@pytest.mark.parametrize(("authorization", "access"), [
    (None, Access.UNAUTHORIZED),
    ("Bearer", Access.UNAUTHORIZED),
    ("Basic " + "a" * 20, Access.UNAUTHORIZED),
    ("Bearer " + "b" * 20, Access.UNAUTHORIZED),
    ("Bearer " + "a" * 20, Access.ALLOWED),
    ("bearer  " + "a" * 20, Access.ALLOWED),
    ("Bearer " + "c" * 20, Access.FORBIDDEN),
])
def test_access_is_401_without_a_known_token_and_403_with_another_workspaces(
        authorization: str | None, access: Access) -> None:
    book = WorkspaceBook()
    book.register(workspace_id="a", display_name="A", token="a" * 20)
    book.register(workspace_id="c", display_name="C", token="c" * 20)
    assert book.access("a", authorization) is access


@pytest.mark.parametrize(("path", "route"), [
    ("/mcp/w/ws1", Route("ws1")),
    ("/mcp/w/ws1/", Route("ws1")),
    ("/mcp/w/ws1/s/py-1", Route("ws1", "py-1")),
    ("/mcp/w/ws1/server-card", Route("ws1", None, card=True)),
    ("/mcp/w/ws1/s/py-1/server-card", Route("ws1", "py-1", card=True)),
    ("/mcp/w/", None),
    ("/mcp/w/ws1/x/py-1", None),
    ("/mcp/w/ws1/s/", None),
    ("/sessions", None),
])
def test_routes(path: str, route: Route | None) -> None:
    assert parse_route(path) == route


@pytest.mark.parametrize(("origin", "allowed"), [
    (None, True),
    (b"http://localhost:3000", True),
    (b"http://127.0.0.1", True),
    (b"https://[::1]:8443", True),
    (b"http://evil.example", False),
    (b"http://localhost.evil.example", False),
    (b"null", False),
    (b"file://", False),
])
def test_origins(origin: bytes | None, allowed: bool) -> None:
    assert origin_loopback(origin) is allowed


def test_timeouts_default_to_60_and_stop_at_600() -> None:
    assert timeout_seconds(None) == 60
    assert timeout_seconds(5) == 5
    assert timeout_seconds(10_000) == 600
    for bad in (0, -1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ToolFailure):
            timeout_seconds(bad)


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()


def test_execution_content_text_then_images_and_errors_without_colours() -> None:
    content, is_error = execution_content({
        "status": "ok", "execution_count": 1,
        "output": [{"type": "stream", "stream_name": "stdout", "text": "hi\n"},
                   {"type": "display_data", "data": {"image/png": PNG + "\n",
                                                     "text/plain": "<Figure>"}}],
        "data": {"text/plain": "42"},
    })
    assert not is_error
    assert [c.type for c in content] == ["text", "image"]
    assert isinstance(content[0], types.TextContent) and content[0].text == "hi\n42\n"
    assert isinstance(content[1], types.ImageContent) and content[1].mimeType == "image/png"
    assert content[1].data == PNG

    content, is_error = execution_content({
        "status": "error", "execution_count": 2,
        "output": [{"type": "error", "error_name": "ZeroDivisionError",
                    "error_message": "division by zero",
                    "error_traceback": ["\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"]}],
        "error_name": "ZeroDivisionError", "error_message": "division by zero",
        "error_traceback": ["..."],
    })
    assert is_error and isinstance(content[0], types.TextContent)
    assert content[0].text == "ZeroDivisionError: division by zero\n"


def test_interrupted_and_empty_and_oversized_results() -> None:
    content, is_error = execution_content({"status": "error", "output": [],
                                           "error_name": "KeyboardInterrupt",
                                           "error_message": "", "error_traceback": []})
    assert is_error and isinstance(content[0], types.TextContent)
    assert content[0].text.startswith("The execution was interrupted.")
    content, _ = execution_content({"status": "ok", "output": []})
    assert isinstance(content[0], types.TextContent) and content[0].text == "(no output)"
    big = "x" * 100_000
    content, _ = execution_content({"status": "ok", "output": [
        {"type": "stream", "stream_name": "stdout", "text": "start" + big + "end"}]})
    text = content[0].text if isinstance(content[0], types.TextContent) else ""
    assert len(text.encode()) <= RESULT_TEXT_BYTES
    assert text.startswith("start") and text.endswith("end") and "bytes omitted" in text


def test_window_frames() -> None:
    hello = frames.parse_window_frame(json.dumps({
        "kind": "hello", "positron_version": "2026.10.0", "commands": [{"id": "a.b"}],
        "session_ids": ["s1"], "foreground_session_id": "s1", "history_api_enabled": True,
        "focused": True}))
    assert hello == frames.Hello("2026.10.0", [{"id": "a.b"}], ["s1"], "s1", True)
    assert frames.parse_window_frame('{"kind": "focused"}') == frames.Focused()
    reply = frames.parse_window_frame('{"kind": "command_reply", "id": "r", "ok": false, '
                                      '"reason": "denied"}')
    assert reply == frames.CommandReply("r", False, None, "denied", None)
    for bad in ("[]", "nope", '{"kind": "dance"}', '{"kind": "command_reply", "id": 1}',
                '{"kind": "sessions_changed", "session_ids": [1]}',
                '{"kind": "hello", "commands": [{"name": "no id"}]}'):
        with pytest.raises(frames.FrameError):
            frames.parse_window_frame(bad)
    request = json.loads(frames.command_request(
        request_id="r1", command_id="c", args=[1], agent_name="claude", agent_version="1",
        deadline_ms=5))
    assert request == {"kind": "command_request", "id": "r1", "command_id": "c", "args": [1],
                       "agent": {"name": "claude", "version": "1"}, "deadline_ms": 5}


async def test_the_broker_sends_to_the_last_focused_window_and_hands_over() -> None:
    broker = WindowBroker(find_timeout=5, reply_timeout=5)
    first, first_out = broker.attach("ws")
    second, second_out = broker.attach("ws")
    assert broker.target("ws") is second  # attached last, nobody focused yet
    broker.on_frame(first, frames.Focused())
    assert broker.target("ws") is first
    result: list[object] = []

    async def run() -> None:
        result.append(await broker.run_command("ws", "cmd", None, agent_name="a",
                                               agent_version=None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(5):
            request = json.loads(await first_out.receive())
        broker.detach(first)  # leaves without answering: the request goes to `second`
        with trio.fail_after(5):
            handed = json.loads(await second_out.receive())
        assert handed["id"] == request["id"]
        broker.on_frame(second, frames.CommandReply(request["id"], True, {"done": 1}))
    assert result == [{"done": 1}]

    async def orphan() -> None:
        with pytest.raises(CommandFailed, match="closed before answering"):
            await broker.run_command("ws", "cmd", None, agent_name=None, agent_version=None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(orphan)
        with trio.fail_after(5):
            await second_out.receive()
        broker.detach(second)


async def test_no_window_fails_after_the_wait() -> None:
    broker = WindowBroker(find_timeout=0.05, reply_timeout=5)
    with pytest.raises(CommandFailed, match="No Positron window"):
        await broker.run_command("ws", "cmd", None, agent_name=None, agent_version=None)


def test_the_stdio_relay_chooses_its_workspace(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"url": "http://127.0.0.1:1/mcp/w/a",
                                                 "token": "ta"}))
    (tmp_path / "b.json").write_text(json.dumps({"url": "http://127.0.0.1:1/mcp/w/b",
                                                 "token": "tb"}))
    workspaces = {"a": {"descriptor": "a.json", "folders": ["/home/u/proj"]},
                  "b": {"descriptor": "b.json", "folders": ["/home/u/proj/sub"]}}
    (tmp_path / "connections.json").write_text(json.dumps({"workspaces": workspaces}))
    assert deepest_folder_match(workspaces, Path("/home/u/proj/sub/x")) == "b"
    assert deepest_folder_match(workspaces, Path("/home/u/proj")) == "a"
    assert deepest_folder_match(workspaces, Path("/home/u/project")) is None

    def choose(workspace: str | None, env: dict[str, str], cwd: str) -> Target:
        return choose_target(workspace=workspace, connections_dir=tmp_path, env=env,
                             cwd=Path(cwd))

    env = {"POSITRON_MCP_URL": "http://127.0.0.1:2/mcp/w/k/s/s1", "POSITRON_MCP_TOKEN": "tk"}
    assert choose("a", env, "/").token == "ta"  # --workspace first
    assert choose(None, env, "/").token == "tk"  # then the kernel's environment
    assert choose(None, {}, "/home/u/proj/sub").token == "tb"  # then the folders
    with pytest.raises(NoTarget, match="contains"):
        choose(None, {}, "/elsewhere")
    with pytest.raises(NoTarget, match="not in"):
        choose("zzz", {}, "/")
    with pytest.raises(NoTarget, match="cannot read"):
        choose_target(workspace=None, connections_dir=tmp_path / "none", env={}, cwd=Path("/"))
