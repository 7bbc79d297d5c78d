"""`kcserver mcp-stdio`, a real process driven by the SDK's stdio client: it relays to the
daemon's MCP server, and answers offline when nothing listens (docs/mcp.md)."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client

from tests.helpers import AGENT, RunningDaemon, call, register, started_session, text_of

KCSERVER = str(Path(sys.executable).parent / "kcserver")


@asynccontextmanager
async def relay(tmp_path: Path, *args: str,
                env: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=KCSERVER, args=["mcp-stdio", *args], env=env,
                                   cwd=str(tmp_path))
    with (tmp_path / "relay.log").open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write, client_info=AGENT) as session:
            with trio.fail_after(60):
                await session.initialize()
            yield session


def write_connections(directory: Path, workspace_id: str, url: str, token: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{workspace_id}.json").write_text(json.dumps({"url": url, "token": token}))
    (directory / "connections.json").write_text(json.dumps({"workspaces": {workspace_id: {
        "descriptor": f"{workspace_id}.json", "folders": [str(directory.parent)]}}}))


async def test_the_relay_runs_code_through_the_daemon(daemon: RunningDaemon,
                                                      tmp_path: Path) -> None:
    ws = await register(daemon)
    session_id = await started_session(daemon, ws["workspace_id"])
    connections = tmp_path / "connections"
    write_connections(connections, ws["workspace_id"], ws["url"], ws["token"])
    async with relay(tmp_path, "--connections", str(connections),
                     "--workspace", ws["workspace_id"]) as agent:
        tools = await agent.list_tools()
        assert "execute_code" in {t.name for t in tools.tools}
        result = await call(agent, "execute_code", session_id=session_id, code="print(6*7)")
        assert (result.isError, text_of(result)) == (False, "42\n")
        result = await call(agent, "execute_code", session_id=session_id, code="1/0")
        assert result.isError and "ZeroDivisionError" in text_of(result)
        # The daemon lists the relay's agent, with the relay's parent (the agent) and cwd.
        status = (await daemon.client.get("/status")).json()["mcp"]
        [client] = status["workspaces"][0]["clients"]
        assert (client["name"], client["working_directory"]) == ("test-agent", str(tmp_path))
        assert isinstance(client["pid"], int)

        # The listener restarts (the last workspace went and came back): the relay's MCP
        # session is gone with it, and the relay opens a new one rather than failing.
        assert (await daemon.client.delete(f"/mcp/workspaces/{ws['workspace_id']}")
                ).status_code == 200
        assert await register(daemon, workspace_id=ws["workspace_id"], token=ws["token"],
                              preferred_port=ws["port"]) == ws
        result = await call(agent, "execute_code", session_id=session_id, code="print(7*6)")
        assert (result.isError, text_of(result)) == (False, "42\n")
    history = (await daemon.client.get(f"/sessions/{session_id}/history")).json()
    assert [h["agent"] for h in history[-3:]] == ["test-agent"] * 3


async def test_the_relay_finds_the_workspace_of_its_folder(daemon: RunningDaemon,
                                                           tmp_path: Path) -> None:
    ws = await register(daemon)
    session_id = await started_session(daemon, ws["workspace_id"])
    connections = tmp_path / "connections"
    write_connections(connections, ws["workspace_id"], ws["url"], ws["token"])
    async with relay(tmp_path, "--connections", str(connections)) as agent:
        listing = json.loads(text_of(await call(agent, "list_sessions")))
        assert [s["session_id"] for s in listing] == [session_id]


async def test_the_relay_is_offline_when_nothing_listens(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    connections = tmp_path / "connections"
    write_connections(connections, "gone", f"http://127.0.0.1:{port}/mcp/w/gone",
                      "t" * 24)
    async with relay(tmp_path, "--connections", str(connections), "--workspace", "gone") as agent:
        tools = await agent.list_tools()
        assert len(tools.tools) == 6
        result = await call(agent, "list_sessions")
        assert result.isError and "offline" in text_of(result)
        assert f"127.0.0.1:{port}" in text_of(result)
    # No workspace at all: still a server, still offline.
    async with relay(tmp_path, "--connections", str(tmp_path / "nowhere")) as agent:
        result = await call(agent, "execute_code", session_id="x", code="1")
        assert result.isError and "offline" in text_of(result)
        assert isinstance(result.content[0], types.TextContent)
