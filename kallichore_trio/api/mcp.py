"""Routes under /mcp: workspace registration and the window channel (docs/mcp.md).

The bearer token, Origin and Host checks of api/__init__.py's guard hooks cover these as every
route. The window channel is a WebSocket on both transports: Hypercorn serves the main Unix
socket with the same connection classes as the TCP port (transport/hypercorn_ext.py), so the
upgrade is accepted and handed over the same way on either, and served with
transport/websocket.py's connection.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio
from quart import Quart, Response, websocket

from kallichore_trio.api.responses import empty, json_response, read_body, with_warning
from kallichore_trio.mcp import frames
from kallichore_trio.models import BodyError
from kallichore_trio.transport.hypercorn_ext import EXTENSION
from kallichore_trio.transport.websocket import ClientConnection, ClientGone

if TYPE_CHECKING:
    from kallichore_trio.daemon import Daemon
    from kallichore_trio.mcp.service import McpService
    from kallichore_trio.mcp.windows import Window

log = logging.getLogger(__name__)

_GONE = (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError)


@attrs.frozen(kw_only=True)
class RegisterWorkspace:
    """The body of POST /mcp/workspaces."""

    display_name: str
    workspace_id: str | None = None
    preferred_port: int | None = None
    token: str | None = None
    #: Sent by Positron; what it may contain is not known, and nothing here depends on it.
    capabilities: Any = None


def register(app: Quart, daemon: Daemon) -> None:
    def service() -> McpService:
        return daemon.mcp

    @app.post("/mcp/workspaces")
    async def register_workspace() -> Response:
        body = await read_body(RegisterWorkspace, "RegisterMcpWorkspace")
        value: RegisterWorkspace = body.value
        port = value.preferred_port
        if port is not None and not 0 <= port <= 65535:
            raise BodyError("preferred_port must be between 0 and 65535")
        try:
            answer = await service().register(
                workspace_id=value.workspace_id, display_name=value.display_name,
                preferred_port=port, token=value.token)
        except ValueError as exc:
            raise BodyError(str(exc)) from None
        return with_warning(json_response(answer), body.ignored)

    @app.delete("/mcp/workspaces/<workspace_id>")
    async def deregister_workspace(workspace_id: str) -> Response:
        if not await service().deregister(workspace_id):
            return empty(404)
        return json_response(None)

    @app.get("/mcp/workspaces/<workspace_id>/channel")
    async def channel_without_upgrade(workspace_id: str) -> Response:
        if service().workspace(workspace_id) is None:
            return empty(404)
        return json_response({"code": "upgrade_required",
                              "message": "The window channel is a WebSocket: send an upgrade"},
                             400)

    @app.websocket("/mcp/workspaces/<workspace_id>/channel")
    async def channel(workspace_id: str) -> Response | None:
        if service().workspace(workspace_id) is None:
            return empty(404)
        handover = websocket.scope["extensions"].get(EXTENSION)
        if handover is None:
            return json_response(
                {"code": "500", "message": "WebSocket handover is not installed"}, 500)
        await websocket.accept()
        conn = await handover.take_over()
        if conn is None:
            return None
        try:
            await serve_window(service(), workspace_id, conn)
        finally:
            await conn.close()
        return None


async def serve_window(service: McpService, workspace_id: str, conn: ClientConnection) -> None:
    """One window, until it leaves or its workspace is deregistered."""
    window, outgoing = service.broker.attach(workspace_id)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, conn, outgoing, nursery.cancel_scope)
            await _read(service, window, conn)
            nursery.cancel_scope.cancel()
    finally:
        service.broker.detach(window)


async def _write(conn: ClientConnection, outgoing: trio.MemoryReceiveChannel[str],
                 scope: trio.CancelScope) -> None:
    try:
        async for text in outgoing:
            await conn.send_text(text)
    except _GONE:
        pass
    scope.cancel()  # the window is gone, or its workspace was deregistered


async def _read(service: McpService, window: Window, conn: ClientConnection) -> None:
    try:
        while (text := await conn.receive_text()) is not None:
            try:
                frame = frames.parse_window_frame(text)
            except frames.FrameError as exc:
                log.warning("MCP workspace %s: window %d sent a frame we cannot use: %s",
                            window.workspace_id, window.serial, exc)
                continue
            service.broker.on_frame(window, frame)
    except _GONE:
        pass


__all__ = ["RegisterWorkspace", "register", "serve_window"]
