"""The MCP server proper: the SDK's low-level `Server`, with our tools.

The SDK speaks the protocol (initialize, tools/list, tools/call, ...); we give it the tool
definitions (tools.py) and route each call to `ToolCalls` with the caller's context: the view
the listener's gate resolved from the URL (put in the ASGI scope under ROUTE_KEY), and the
agent's name and version from its `initialize`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from mcp import types
from mcp.server.lowlevel import Server

from kallichore_trio.config import KALLICHORE_VERSION
from kallichore_trio.mcp.address import Route
from kallichore_trio.mcp.calls import CallContext, ToolCalls
from kallichore_trio.mcp.tools import TOOLS, error_result

#: Where the gate puts the request's `Route` in the ASGI scope.
ROUTE_KEY = "kallichore.mcp_route"

INSTRUCTIONS = (
    "Tools to work in the user's Positron interpreter sessions: list them, run code in them "
    "as the user would (the user sees it in the console), evaluate expressions, interrupt, "
    "and run Positron IDE commands in the user's window."
)


@attrs.frozen
class CallerInfo:
    """Who is calling, as the server sees it (for /status's clients)."""

    route: Route
    mcp_session_id: str | None
    name: str | None
    version: str | None
    headers: dict[str, str]


def build_server(calls: ToolCalls, on_call: Callable[[CallerInfo], None]) -> Server[Any, Any]:
    server: Server[Any, Any] = Server("kallichore", version=KALLICHORE_VERSION,
                                      instructions=INSTRUCTIONS)

    def caller() -> CallerInfo | None:
        ctx = server.request_context
        request = ctx.request
        route = request.scope.get(ROUTE_KEY) if request is not None else None
        if not isinstance(route, Route):
            return None
        params = ctx.session.client_params
        info = params.clientInfo if params is not None else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        found = CallerInfo(route, headers.get("mcp-session-id"),
                           info.name if info else None, info.version if info else None, headers)
        on_call(found)
        return found

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        caller()
        return TOOLS

    # Arguments are checked by ToolCalls, with messages that say what to do; and in a kernel's
    # own view `session_id` may be left out, which the shared schema cannot say.
    @server.call_tool(validate_input=False)
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        found = caller()
        if found is None:
            return error_result("This server serves tools only through its HTTP routes")
        ctx = CallContext(found.route.workspace_id, found.route.session_id,
                          found.name, found.version)
        return await calls.call(ctx, name, arguments)

    return server


__all__ = ["ROUTE_KEY", "CallerInfo", "build_server"]
