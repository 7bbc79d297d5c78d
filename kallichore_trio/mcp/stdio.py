"""`kcserver mcp-stdio`: a stdio MCP server that relays to a workspace's HTTP one.

For agents that only start MCP servers as subprocesses (docs/mcp.md). Which workspace:
`--workspace ID` (looked up in `DIR/connections.json`), else `POSITRON_MCP_URL` and
`POSITRON_MCP_TOKEN` from the environment (a kernel's own view), else the workspace of
`DIR/connections.json` whose folder contains the working directory (the deepest one).

Both sides are the SDK's: a stdio `Server` towards the agent, a Streamable HTTP
`ClientSession` towards the daemon, opened at the first call and reopened after a failure.
When the daemon does not answer, the relay still lists the tools and says, in each call's
error, that it is offline and where it looked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from mcp import ClientSession, McpError, types
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from kallichore_trio.config import KALLICHORE_VERSION
from kallichore_trio.mcp.service import CWD_HEADER, PID_HEADER
from kallichore_trio.mcp.tools import MAX_TIMEOUT_S, TOOLS, error_result

log = logging.getLogger(__name__)

#: Connecting to the daemon and initializing the MCP session.
CONNECT_TIMEOUT = 10.0
#: A tool call may run up to the tools' own maximum (600 s) plus this.
CALL_MARGIN = 30.0


@attrs.frozen
class Target:
    url: str
    token: str


class NoTarget(Exception):
    """No workspace could be chosen; the message says what was tried."""


def default_connections_dir() -> Path:
    from platformdirs import user_state_dir

    return Path(user_state_dir("kallichore")) / "mcp"


def deepest_folder_match(workspaces: dict[str, Any], cwd: Path) -> str | None:
    """The workspace with the deepest folder that is `cwd` or contains it. Pure."""
    best: tuple[int, str] | None = None
    for workspace_id, entry in workspaces.items():
        folders = entry.get("folders", []) if isinstance(entry, dict) else []
        for folder in folders if isinstance(folders, list) else []:
            if not isinstance(folder, str):
                continue
            path = Path(folder)
            if (cwd == path or path in cwd.parents) and (best is None or
                                                         len(path.parts) > best[0]):
                best = (len(path.parts), workspace_id)
    return best[1] if best else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NoTarget(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise NoTarget(f"{path} does not hold a JSON object")
    return value


def choose_target(*, workspace: str | None, connections_dir: Path, env: dict[str, str],
                  cwd: Path) -> Target:
    if workspace is None and env.get("POSITRON_MCP_URL") and env.get("POSITRON_MCP_TOKEN"):
        return Target(env["POSITRON_MCP_URL"], env["POSITRON_MCP_TOKEN"])
    connections_file = connections_dir / "connections.json"
    workspaces = _read_json(connections_file).get("workspaces")
    if not isinstance(workspaces, dict):
        raise NoTarget(f"{connections_file} has no `workspaces` object")
    if workspace is None:
        workspace = deepest_folder_match(workspaces, cwd)
        if workspace is None:
            raise NoTarget(f"no workspace in {connections_file} contains {cwd}")
    entry = workspaces.get(workspace)
    if not isinstance(entry, dict) or not isinstance(entry.get("descriptor"), str):
        raise NoTarget(f"workspace {workspace!r} is not in {connections_file}")
    descriptor = _read_json(connections_dir / entry["descriptor"])
    url, token = descriptor.get("url"), descriptor.get("token")
    if not isinstance(url, str) or not isinstance(token, str):
        raise NoTarget(f"the descriptor of workspace {workspace!r} lacks url or token")
    return Target(url, token)


class Upstream:
    """The MCP session with the daemon, held by a task in the relay's nursery."""

    def __init__(self, target: Target | None, reason: str, nursery: trio.Nursery) -> None:
        self.target = target
        self.reason = reason  # why there is no target (when None)
        self._nursery = nursery
        self.session: ClientSession | None = None
        self._scope: trio.CancelScope | None = None
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<Upstream {self.target!r} connected={self.session is not None}>"

    def offline(self, why: str) -> types.CallToolResult:
        where = self.target.url if self.target else self.reason
        return error_result(f"The Kallichore MCP server is offline ({where}): {why}. Is "
                            "Positron running with this workspace open? Try again later.")

    async def get(self, client_info: types.Implementation | None) -> ClientSession:
        async with self._lock:
            if self.session is None:
                if self.target is None:
                    raise ConnectionError(self.reason)
                await self._nursery.start(self._hold, self.target, client_info)
            assert self.session is not None
            return self.session

    def drop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self.session = None

    async def _hold(self, target: Target, client_info: types.Implementation | None, *,
                    task_status: trio.TaskStatus[None]) -> None:
        headers = {"Authorization": f"Bearer {target.token}", PID_HEADER: str(os.getppid()),
                   CWD_HEADER: os.getcwd()}
        started = False
        try:
            with trio.CancelScope() as self._scope:
                http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(
                    CONNECT_TIMEOUT, read=MAX_TIMEOUT_S + CALL_MARGIN))
                async with http, streamable_http_client(target.url, http_client=http) as (
                        r, w, _):
                    async with ClientSession(r, w, client_info=client_info) as session:
                        with trio.fail_after(CONNECT_TIMEOUT):
                            await session.initialize()
                        self.session = session
                        started = True
                        task_status.started()
                        await trio.sleep_forever()
        except Exception as exc:
            if not started:
                raise ConnectionError(_describe(exc)) from None
            log.info("the connection to %s ended: %s", target.url, _describe(exc))
        finally:
            self.session = None


#: Tools that may be called again after a connection failed mid-call: running code or a
#: Positron command twice is not harmless, so those are repeated only when the daemon
#: certainly did not process the call.
SAFE_TO_REPEAT = frozenset({"list_sessions", "list_positron_commands", "interrupt_session"})


def _not_processed(exc: BaseException) -> bool:
    """The daemon answered 404 for our MCP session (it restarted, or the listener did): the
    call was refused before anything ran. The SDK reports that as error 32600."""
    return isinstance(exc, McpError) and exc.error.code == 32600


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def build_relay(upstream: Upstream) -> Server[Any, Any]:
    server: Server[Any, Any] = Server("kallichore", version=KALLICHORE_VERSION)

    def client_info() -> types.Implementation | None:
        params = server.request_context.session.client_params
        return params.clientInfo if params is not None else None

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return TOOLS  # the same list online and offline: the tools are ours

    @server.call_tool(validate_input=False)
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        for attempt in (1, 2):
            try:
                session = await upstream.get(client_info())
            except Exception as exc:  # refused, timed out, not an MCP server, no target
                return upstream.offline(_describe(exc))
            try:
                with trio.fail_after(MAX_TIMEOUT_S + CALL_MARGIN):
                    return await session.call_tool(name, arguments)
            except Exception as exc:  # the connection broke, or the daemon forgot us
                upstream.drop()
                if attempt == 1 and (name in SAFE_TO_REPEAT or _not_processed(exc)):
                    continue  # once more, on a fresh connection
                if name in SAFE_TO_REPEAT:
                    return upstream.offline(_describe(exc))
                return error_result(
                    f"The connection to the Kallichore MCP server broke during the call "
                    f"({_describe(exc)}), so {name} may or may not have run. Check (with "
                    "list_sessions, or in the console) before calling it again.")
        raise AssertionError("unreachable")

    return server


async def relay(target: Target | None, reason: str) -> None:
    async with trio.open_nursery() as nursery:
        upstream = Upstream(target, reason, nursery)
        server = build_relay(upstream)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcserver mcp-stdio",
                                     description="A stdio MCP server relaying to Kallichore's.")
    parser.add_argument("--connections", type=Path, default=None,
                        help="directory holding connections.json")
    parser.add_argument("--workspace", default=None, help="the workspace id to use")
    ns = parser.parse_args(argv)
    # stdout is the protocol: logs go to stderr only.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    connections = ns.connections or default_connections_dir()
    try:
        target: Target | None = choose_target(
            workspace=ns.workspace, connections_dir=connections, env=dict(os.environ),
            cwd=Path.cwd())
        reason = ""
    except NoTarget as exc:
        target, reason = None, str(exc)
        log.warning("no MCP workspace: %s; serving offline", reason)
    try:
        trio.run(relay, target, reason)
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["NoTarget", "Target", "choose_target", "deepest_folder_match", "main"]
