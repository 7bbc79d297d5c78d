"""The MCP server over Streamable HTTP, with the SDK's own client, against real ipykernel
sessions: registration, the tools, the window channel, and who may call (docs/mcp.md)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import zmq
from httpx_ws import WebSocketUpgradeError, aconnect_ws
from mcp import ClientSession, types

from kallichore_trio.app import run_daemon
from kallichore_trio.config import Timeouts
from kallichore_trio.mcp.service import McpService
from kallichore_trio.registry import SessionRegistry
from tests.helpers import (
    KCSERVER,
    TOKEN,
    Channel,
    RawWebSocket,
    RunningDaemon,
    call,
    daemon_config,
    kernel_event,
    launch,
    mcp_session,
    open_channel,
    register,
    running_daemon,
    started_session,
    stream_text,
    text_of,
)

# The SDK's client iterates its SSE responses without closing the iterators (mcp 1.30), and
# trio warns when they are collected: only that warning, from httpx, httpx-sse and httpcore.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator 'http(x|x_sse|core)\\..*was garbage collected:ResourceWarning")


@pytest.fixture
async def daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    # Short broker waits, so that "no window" fails fast.
    timeouts = Timeouts(shutdown_request=3.0, terminate=2.0, kill=2.0, mcp_window_wait=2.0,
                        mcp_command_reply=10.0)
    async for running in running_daemon(nursery, daemon_config(tmp_path, timeouts=timeouts)):
        yield running


async def test_registration_status_and_the_kernel_environment(daemon: RunningDaemon) -> None:
    status = (await daemon.client.get("/status")).json()["mcp"]
    assert status == {"active": False, "port": None, "request_count": 0, "workspaces": []}

    first = await register(daemon)
    assert first["workspace_id"].startswith("test-project-")
    assert first["url"] == f"http://127.0.0.1:{first['port']}/mcp/w/{first['workspace_id']}"
    # Positron re-registers after a reload with what it kept: same id, token and port.
    again = await register(daemon, workspace_id=first["workspace_id"], token=first["token"],
                           preferred_port=first["port"])
    assert again == first
    second = await register(daemon, workspace_id="second-ws", token="s" * 24)
    assert (second["workspace_id"], second["token"], second["port"]) == (
        "second-ws", "s" * 24, first["port"])

    status = (await daemon.client.get("/status")).json()["mcp"]
    assert status["active"] and status["port"] == first["port"]
    assert [(w["id"], w["display_name"], w["connected"], w["clients"])
            for w in status["workspaces"]] == [(first["workspace_id"], "Test Project", False, []),
                                               ("second-ws", "Test Project", False, [])]

    session_id = await started_session(daemon, first["workspace_id"])
    response = await daemon.client.post(
        f"/sessions/{session_id}/execute",
        json={"code": "import os; print(os.environ['POSITRON_MCP_URL']); "
                      "print(os.environ['POSITRON_MCP_TOKEN'])"})
    assert response.json()["output"][0]["text"] == (
        f"{first['url']}/s/{session_id}\n{first['token']}\n")

    bad = await daemon.client.post("/mcp/workspaces",
                                   json={"display_name": "x", "token": "too short"})
    assert bad.status_code == 400 and "token" in bad.text
    assert (await daemon.client.post("/mcp/workspaces", json={})).status_code == 400
    unauthorized = await daemon.client.post("/mcp/workspaces", json={"display_name": "x"},
                                            headers={"Authorization": ""})
    assert unauthorized.status_code == 401

    assert (await daemon.client.delete("/mcp/workspaces/second-ws")).status_code == 200
    assert (await daemon.client.delete("/mcp/workspaces/second-ws")).status_code == 404
    assert (await daemon.client.get("/status")).json()["mcp"]["active"]
    assert (await daemon.client.delete(f"/mcp/workspaces/{first['workspace_id']}")
            ).status_code == 200
    status = (await daemon.client.get("/status")).json()["mcp"]
    assert (status["active"], status["port"], status["workspaces"]) == (False, None, [])
    with pytest.raises(httpx.ConnectError):  # the listener has stopped
        async with httpx.AsyncClient() as client:
            await client.get(f"{first['url']}/server-card")
    # Registered again (a window reload after the last one closed): the port it kept.
    back = await register(daemon, workspace_id=first["workspace_id"], token=first["token"],
                          preferred_port=first["port"])
    assert back == first


async def test_a_taken_preferred_port_gives_another(daemon: RunningDaemon) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        answer = await register(daemon, preferred_port=taken)
    assert answer["port"] != taken
    bad = await daemon.client.post("/mcp/workspaces",
                                   json={"display_name": "x", "preferred_port": 70000})
    assert bad.status_code == 400


async def test_code_tools_run_through_the_sessions_one_path(daemon: RunningDaemon) -> None:
    ws = await register(daemon)
    session_id = await started_session(daemon, ws["workspace_id"])
    async with open_channel(daemon, session_id) as console, \
            mcp_session(ws["url"], ws["token"]) as agent:
        tools = await agent.list_tools()
        assert {t.name for t in tools.tools} == {
            "list_sessions", "execute_code", "evaluate_code", "interrupt_session",
            "list_positron_commands", "run_positron_command"}
        listing = json.loads(text_of(await call(agent, "list_sessions")))
        assert [(s["session_id"], s["status"], s["language"]) for s in listing] == [
            (session_id, "idle", "python")]

        result = await call(agent, "execute_code", session_id=session_id, code="print(6*7)")
        assert not result.isError and text_of(result) == "42\n"
        # The console saw the agent's request first, then its output.
        requested = await console.wait_for(lambda f: kernel_event(f, "executionRequested"))
        event = requested["executionRequested"]
        assert event["code"] == "print(6*7)"
        assert event["attribution"] == {"source": "agent", "agent_name": "test-agent",
                                        "agent_version": "9.9",
                                        "workspace_id": ws["workspace_id"],
                                        "tool": "execute_code"}
        frames = await console.wait_done(event["msg_id"])
        assert stream_text(frames, event["msg_id"]) == "42\n"
        history = (await daemon.client.get(f"/sessions/{session_id}/history")).json()
        assert history[-1]["input"] == "print(6*7)" and history[-1]["output"] == "42\n"
        assert (history[-1]["source"], history[-1]["agent"]) == ("agent", "test-agent")

        result = await call(agent, "execute_code", session_id=session_id, code="1/0")
        assert result.isError
        assert "ZeroDivisionError" in text_of(result) and "Traceback" in text_of(result)
        assert "\x1b[" not in text_of(result)

        result = await call(agent, "execute_code", session_id=session_id, code=(
            "import io\nimport matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "from IPython.display import Image, display\n"
            "fig = plt.figure(); plt.plot([1, 3, 2]); buf = io.BytesIO()\n"
            "fig.savefig(buf, format='png'); plt.close(fig); display(Image(buf.getvalue()))"))
        assert not result.isError, text_of(result)
        [image] = [c for c in result.content if isinstance(c, types.ImageContent)]
        assert image.mimeType == "image/png"
        assert base64.b64decode(image.data).startswith(b"\x89PNG\r\n\x1a\n")

        result = await call(agent, "evaluate_code", session_id=session_id, code="6*7")
        assert (result.isError, text_of(result)) == (False, "42\n")

        result = await call(agent, "execute_code", session_id="nope", code="1")
        assert result.isError and "Unknown session 'nope'" in text_of(result)
        result = await call(agent, "execute_code", session_id=session_id,
                            code="import time\nwhile True: time.sleep(0.05)", timeout_s=1)
        assert result.isError and "did not finish within 1 s" in text_of(result)
        result = await call(agent, "execute_code", session_id=session_id, code="print('after')")
        assert text_of(result) == "after\n"

        status = (await daemon.client.get("/status")).json()["mcp"]
        assert status["request_count"] > 0
        [client] = status["workspaces"][0]["clients"]
        assert (client["name"], client["version"]) == ("test-agent", "9.9")


async def test_busy_kernels_evaluate_only_when_asked_to_wait_and_interrupts_stop_code(
        daemon: RunningDaemon) -> None:
    ws = await register(daemon)
    session_id = await started_session(daemon, ws["workspace_id"])
    async with open_channel(daemon, session_id) as console, \
            mcp_session(ws["url"], ws["token"]) as agent, \
            mcp_session(ws["url"], ws["token"]) as other, trio.open_nursery() as nursery:
        results: dict[str, types.CallToolResult] = {}
        done = {"sleep": trio.Event(), "short": trio.Event()}

        async def run(key: str, session: ClientSession, tool: str, **args: Any) -> None:
            results[key] = await call(session, tool, **args)
            done[key].set()

        nursery.start_soon(partial(run, "sleep", agent, "execute_code", session_id=session_id,
                                   code="import time; time.sleep(60)"))
        await console.wait_for(lambda f: kernel_event(f, "executionRequested"))
        await wait_busy(console)

        refused = await call(other, "evaluate_code", session_id=session_id, code="1")
        assert refused.isError and "busy" in text_of(refused) and "wait" in text_of(refused)

        result = await call(other, "interrupt_session", session_id=session_id)
        assert not result.isError, text_of(result)
        with trio.fail_after(30):
            await done["sleep"].wait()
        assert results["sleep"].isError
        assert "interrupted" in text_of(results["sleep"])
        assert "KeyboardInterrupt" in text_of(results["sleep"])

        # `wait`: queued behind the running code, answered once it has finished.
        nursery.start_soon(partial(run, "short", agent, "execute_code", session_id=session_id,
                                   code="import time; time.sleep(2); print('slept')"))
        await console.wait_for(lambda f: kernel_event(f, "executionRequested"))
        await wait_busy(console)
        waited = await call(other, "evaluate_code", session_id=session_id, code="6*7", wait=True)
        assert (waited.isError, text_of(waited)) == (False, "42\n")
        with trio.fail_after(30):
            await done["short"].wait()
        assert text_of(results["short"]) == "slept\n"


async def wait_busy(console: Channel) -> None:
    def busy(frame: dict[str, Any]) -> bool:
        status = kernel_event(frame, "status")
        return bool(status) and status["status"] == "busy"

    if not any(busy(f) for f in console.frames[-5:]):
        await console.wait_for(busy)


@asynccontextmanager
async def window(daemon: RunningDaemon, workspace_id: str,
                 hello: dict[str, Any] | None) -> AsyncIterator[Any]:
    url = f"{daemon.ws_base}/mcp/workspaces/{workspace_id}/channel"
    async with aconnect_ws(url, daemon.client) as ws:
        if hello is not None:
            await ws.send_text(json.dumps({"kind": "hello", **hello}))
        yield ws


def hello(*commands: str, focused: bool = True, **more: Any) -> dict[str, Any]:
    return {"positron_version": "2026.10.0", "session_ids": [], "foreground_session_id": None,
            "history_api_enabled": True, "focused": focused,
            "commands": [{"id": c, "description": f"does {c}", "args": [], "returns": None}
                         for c in commands], **more}


async def answer(ws: Any, ok: bool = True, **fields: Any) -> dict[str, Any]:
    with trio.fail_after(10):
        request = json.loads(await ws.receive_text())
    assert request["kind"] == "command_request"
    await ws.send_text(json.dumps({"kind": "command_reply", "id": request["id"], "ok": ok,
                                   **fields}))
    return request


async def answer_first(*windows: Any) -> Any:
    """Answer the request that comes first, on whichever window; return that window."""
    send, receive = trio.open_memory_channel[tuple[Any, dict[str, Any]]](len(windows))

    async def listen(ws: Any) -> None:
        await send.send((ws, json.loads(await ws.receive_text())))

    async with trio.open_nursery() as nursery:
        for ws in windows:
            nursery.start_soon(listen, ws)
        ws, request = await receive.receive()
        nursery.cancel_scope.cancel()
    await ws.send_text(json.dumps({"kind": "command_reply", "id": request["id"], "ok": True}))
    return ws


async def test_positron_commands_go_to_the_last_focused_window(daemon: RunningDaemon) -> None:
    ws = await register(daemon)
    wid = ws["workspace_id"]
    plain = await daemon.client.get(f"/mcp/workspaces/{wid}/channel")
    assert (plain.status_code, plain.json()["code"]) == (400, "upgrade_required")
    assert (await daemon.client.get("/mcp/workspaces/nope/channel")).status_code == 404
    with pytest.raises(WebSocketUpgradeError) as refused:
        async with aconnect_ws(f"{daemon.ws_base}/mcp/workspaces/nope/channel", daemon.client):
            pass
    assert refused.value.response.status_code == 404

    async with mcp_session(ws["url"], ws["token"]) as agent:
        result = await call(agent, "run_positron_command", command_id="x.y")
        assert result.isError and "No Positron window" in text_of(result)
        result = await call(agent, "list_positron_commands")
        assert result.isError and "No Positron window" in text_of(result)

        send, receive = trio.open_memory_channel[types.CallToolResult](4)

        async def run(command: str, args: Any = None) -> None:
            await send.send(await call(agent, "run_positron_command", command_id=command,
                                       args=args))

        async def next_result() -> types.CallToolResult:
            with trio.fail_after(20):
                return await receive.receive()

        async with window(daemon, wid, hello("files.save", "editor.open")) as first, \
                trio.open_nursery() as nursery:
            nursery.start_soon(run, "files.save", ["a.py"])
            request = await answer(first, result={"saved": "a.py"})
            assert (request["command_id"], request["args"], request["agent"]) == (
                "files.save", ["a.py"], {"name": "test-agent", "version": "9.9"})
            assert isinstance(request["deadline_ms"], int)
            assert json.loads(text_of(await next_result())) == {"saved": "a.py"}
            # The reply came after the hello on the same channel: the hello has been applied.
            listed = json.loads(text_of(await call(agent, "list_positron_commands")))
            assert [c["id"] for c in listed] == ["files.save", "editor.open"]
            status = (await daemon.client.get("/status")).json()["mcp"]
            assert status["workspaces"][0]["connected"]

            # A second window that gets the focus takes the commands; when it leaves with one
            # unanswered, the request goes back to the first window.
            async with window(daemon, wid, hello("files.save", focused=False)) as second:
                await second.send_text(json.dumps({"kind": "focused"}))
                # Until the daemon has read the `focused`, commands may still go to the first
                # window; once one reaches the second, every later one does.
                with trio.fail_after(20):
                    while True:
                        nursery.start_soon(run, "files.save")
                        receiver = await answer_first(first, second)
                        await next_result()
                        if receiver is second:
                            break
                nursery.start_soon(run, "editor.open")
                with trio.fail_after(10):
                    handed = json.loads(await second.receive_text())
                assert handed["command_id"] == "editor.open"
            request = await answer(first, ok=False, reason="denied", message="not allowed")
            assert request["id"] == handed["id"]
            failed = await next_result()
            assert failed.isError and "denied" in text_of(failed)
            assert "not allowed" in text_of(failed)
            await first.close()


async def test_who_may_call_the_mcp_listener(daemon: RunningDaemon) -> None:
    ws = await register(daemon)
    other = await register(daemon, workspace_id="other-ws")
    session_id = await daemon.create(workspace_id=ws["workspace_id"])
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(timeout=30) as client:
        async def post(url: str, **headers: str) -> httpx.Response:
            return await client.post(url, json=initialize, headers={**accept, **headers})

        bearer = {"Authorization": f"Bearer {ws['token']}"}
        assert (await post(ws["url"])).status_code == 401
        assert (await post(ws["url"], Authorization="Bearer wrong-token-0000")).status_code == 401
        assert (await post(ws["url"], Authorization=f"Bearer {other['token']}")
                ).status_code == 403
        assert (await post(f"{ws['url']}/s/{session_id}",
                           Authorization=f"Bearer {other['token']}")).status_code == 403
        assert (await post(ws["url"], **bearer)).status_code == 200
        assert (await post(ws["url"], **bearer, Origin="http://localhost:8080")
                ).status_code == 200
        assert (await post(ws["url"], **bearer, Origin="https://evil.example")
                ).status_code == 403
        assert (await post(ws["url"], **bearer, Host="evil.example")).status_code == 403
        assert (await post(f"{ws['url']}/s/no-such-session", **bearer)).status_code == 404
        assert (await post(f"http://127.0.0.1:{ws['port']}/elsewhere", **bearer)
                ).status_code == 404

        card = await client.get(f"{ws['url']}/server-card")
        assert card.status_code == 200
        assert card.json()["transport"] == {"type": "streamable-http", "url": ws["url"]}
        assert "execute_code" in {t["name"] for t in card.json()["tools"]}
        card = await client.get(f"{ws['url']}/server-card", headers={"Host": "evil.example"})
        assert card.status_code == 403


async def test_a_kernels_own_view_serves_its_session(daemon: RunningDaemon) -> None:
    ws = await register(daemon)
    session_id = await started_session(daemon, ws["workspace_id"])
    elsewhere = await daemon.create(workspace_id=ws["workspace_id"])
    async with mcp_session(f"{ws['url']}/s/{session_id}", ws["token"]) as kernel_agent, \
            open_channel(daemon, session_id) as console:
        result = await call(kernel_agent, "execute_code", code="print('mine')")
        assert text_of(result) == "mine\n"
        result = await call(kernel_agent, "execute_code", session_id=elsewhere, code="1")
        assert result.isError and session_id in text_of(result)

        assert (await daemon.client.post(f"/sessions/{session_id}/kill")).status_code == 200
        await console.wait_for(lambda f: kernel_event(f, "exited") is not None)
        for tool, args in (("execute_code", {"code": "1"}), ("interrupt_session", {})):
            result = await call(kernel_agent, tool, **args)
            assert result.isError and "has exited" in text_of(result)


async def test_the_window_channel_on_the_unix_socket_transport(tmp_path: Path) -> None:
    config = attrs.evolve(daemon_config(tmp_path, transport="socket"),
                          timeouts=Timeouts(mcp_window_wait=5.0))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(run_daemon, config)
        transport = httpx.AsyncHTTPTransport(uds=address.socket_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=60) as client:
            ws = (await client.post("/mcp/workspaces", json={"display_name": "Sock"})).json()
            window_ws = await RawWebSocket.connect(
                await trio.open_unix_socket(address.socket_path),
                f"/mcp/workspaces/{ws['workspace_id']}/channel", token=TOKEN)
            await window_ws.send_text(json.dumps({"kind": "hello", **hello("a.b")}))
            async with mcp_session(ws["url"], ws["token"]) as agent, \
                    trio.open_nursery() as calls:
                results: list[types.CallToolResult] = []

                async def run() -> None:
                    results.append(await call(agent, "run_positron_command", command_id="a.b"))

                calls.start_soon(run)
                with trio.fail_after(10):
                    request = json.loads(await window_ws.receive_text())
                await window_ws.send_text(json.dumps({"kind": "command_reply",
                                                      "id": request["id"], "ok": True,
                                                      "result": 7}))
            assert text_of(results[0]) == "7"
            await window_ws.stream.aclose()
            assert (await client.post("/shutdown")).json() is None


async def test_sessions_a_window_shows_are_the_workspaces_too(daemon: RunningDaemon) -> None:
    ws = await register(daemon)
    mine = await daemon.create()  # created without workspace_id (an older client)
    await daemon.create()  # not shown by any window: not the workspace's
    async with window(daemon, ws["workspace_id"], hello("sync", session_ids=[mine],
                                                        foreground_session_id=mine)) as win, \
            mcp_session(ws["url"], ws["token"]) as agent, trio.open_nursery() as nursery:
        # A command round trip: once it is answered, the hello before it has been applied.
        nursery.start_soon(partial(call, agent, "run_positron_command", command_id="sync"))
        await answer(win)
        listing = json.loads(text_of(await call(agent, "list_sessions")))
        assert [(s["session_id"], s["foreground"]) for s in listing] == [(mine, True)]


async def test_tool_calls_count_as_activity(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The service tells the daemon (its `nudge`, for idle shutdown) of every request."""
    config = daemon_config(tmp_path)
    context: zmq.Context[Any] = zmq.Context()
    registry = SessionRegistry(config, nursery, context, tmp_path)
    nudges: list[float] = []
    service = McpService(config, registry, nursery,
                         on_activity=lambda: nudges.append(trio.current_time()))
    try:
        ws = await service.register(workspace_id=None, display_name="Idle", preferred_port=None,
                                    token=None)
        async with mcp_session(ws["url"], ws["token"]) as agent:
            before = len(nudges)
            await call(agent, "list_sessions")
            assert len(nudges) > before
    finally:
        service.stop()
        context.term()


def sdk_mapped(pid: int) -> bool:
    """Whether the process has loaded the MCP SDK: its pydantic brings pydantic_core, a compiled
    extension, whose file shows in the process's memory map (nothing else of ours loads it)."""
    return "pydantic_core" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/<pid>/maps")
@pytest.mark.skipif(not KCSERVER.exists(), reason="kcserver is not installed")
async def test_the_sdk_is_loaded_at_the_first_registration(short_dir: Path) -> None:
    """A real kcserver: serving, asked for its status, it has not loaded the SDK; the first
    registration loads it, and the listener works."""
    conn_file = short_dir / "kallichore.json"
    args = ["--transport", "tcp", "--token", "none", "--connection-file", str(conn_file)]
    async with launch(args, short_dir) as server, server.client() as client:
        pid = server.process.pid
        status = (await client.get("/status")).json()["mcp"]
        assert status["active"] is False
        assert not sdk_mapped(pid)
        response = await client.post("/mcp/workspaces", json={"display_name": "Lazy"})
        assert response.status_code == 200, response.text
        ws = response.json()
        assert sdk_mapped(pid)
        async with mcp_session(ws["url"], ws["token"]) as agent:
            assert json.loads(text_of(await call(agent, "list_sessions"))) == []
