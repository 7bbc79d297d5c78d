"""The MCP listener: one loopback TCP port, served by its own Hypercorn server.

Why its own server rather than routes of the Quart app: the MCP endpoints live on a port of
their own anyway (agents get a URL that carries no daemon token), the SDK's Streamable HTTP
transport is a plain ASGI app built on Starlette with a task group that must outlive each
request (`StreamableHTTPSessionManager.run`), and Quart's request/response wrappers would only
stand between the two. So `McpListener` owns a nursery with the session manager and
`hypercorn.trio.serve`, from `start` until `stop` (docs/mcp.md).

In front of the SDK's app sits `McpGate`, which decides who may call (docs/security.md):
loopback `Host` and `Origin` only, then the URL (`/mcp/w/<workspace>[/s/<session>]`,
`.../server-card`), then the workspace's bearer token (401 without a valid one, 403 with another
workspace's).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import hypercorn.config
import hypercorn.trio
import trio
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from kallichore_trio.config import KALLICHORE_VERSION
from kallichore_trio.mcp.address import LOOPBACK, Route, parse_route, route_url
from kallichore_trio.mcp.server import ROUTE_KEY
from kallichore_trio.mcp.tools import TOOLS
from kallichore_trio.mcp.workspaces import Access, WorkspaceBook
from kallichore_trio.security import header, host_allowed

log = logging.getLogger(__name__)

class _QuietStreamEnd(logging.Filter):
    """The SDK logs, with a traceback at ERROR, the normal end of an agent's GET event stream
    (its session was closed: ClosedResourceError); that is no error of ours or the agent's."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == "Error in standalone SSE writer"
                    and type(exc).__name__ == "ClosedResourceError")


logging.getLogger("mcp.server.streamable_http").addFilter(_QuietStreamEnd())


def origin_loopback(origin: bytes | None) -> bool:
    """No Origin (not a browser), or an http(s) origin on a loopback host."""
    if origin is None:
        return True
    try:
        parts = urlsplit(origin.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and host_allowed(
        parts.netloc, LOOPBACK)


def server_card(route: Route, url: str) -> dict[str, Any]:
    """What an agent may learn before it has the token: what this server is and how to call."""
    return {
        "name": "kallichore",
        "title": "Positron interpreter sessions (Kallichore)",
        "version": KALLICHORE_VERSION,
        "description": "Run code in the user's Positron sessions and Positron commands in "
                       "the user's window.",
        "transport": {"type": "streamable-http", "url": url},
        "authentication": {"required": True, "schemes": ["bearer"]},
        "workspace_id": route.workspace_id,
        "session_id": route.session_id,
        "tools": [{"name": t.name, "description": t.description} for t in TOOLS],
    }


async def _respond(send: Any, status: int, body: bytes = b"",
                   content_type: bytes | None = None,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-length", str(len(body)).encode())] + (extra or [])
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class McpGate:
    """The listener's ASGI app: the checks, the server card, then the SDK's transport."""

    def __init__(self, book: WorkspaceBook, session_exists: Callable[[str], bool],
                 on_request: Callable[[Route, str, dict[str, str]], None]) -> None:
        self.book = book
        self.session_exists = session_exists
        self.on_request = on_request
        self.manager: StreamableHTTPSessionManager | None = None
        self.port = 0

    def __repr__(self) -> str:
        return f"<McpGate port={self.port}>"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # no WebSockets here: the connection is closed
        await self._http(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = scope["headers"]
        what = f"{scope['method']} {scope['path']!r}"
        if not host_allowed(header(headers, "host"), LOOPBACK):
            log.warning("MCP: refused %s: Host is not loopback", what)
            await _respond(send, 403, b"Host not allowed: use 127.0.0.1 or localhost",
                           b"text/plain")
            return
        if not origin_loopback(header(headers, "origin")):
            log.warning("MCP: refused %s: Origin is not loopback", what)
            await _respond(send, 403, b"Origin not allowed", b"text/plain")
            return
        route = parse_route(scope["path"])
        if route is None:
            await _respond(send, 404)
            return
        if route.card:
            if scope["method"] not in ("GET", "HEAD") or self.book.get(
                    route.workspace_id) is None:
                await _respond(send, 404 if scope["method"] in ("GET", "HEAD") else 405)
                return
            card = server_card(route, self.url_of(route))
            await _respond(send, 200, json.dumps(card).encode(), b"application/json")
            return
        authorization = header(headers, "authorization")
        access = self.book.access(
            route.workspace_id,
            authorization.decode("latin-1") if authorization is not None else None)
        if access is Access.UNAUTHORIZED:
            log.warning("MCP: refused %s: missing or wrong token", what)
            await _respond(send, 401, extra=[(b"www-authenticate", b'Bearer realm="kallichore"')])
            return
        if access is Access.FORBIDDEN:
            log.warning("MCP: refused %s: the token of another workspace", what)
            await _respond(send, 403, b"This token is for another workspace", b"text/plain")
            return
        if route.session_id is not None and not self.session_exists(route.session_id):
            await _respond(send, 404, b"Unknown session", b"text/plain")
            return
        manager = self.manager
        if manager is None:
            await _respond(send, 503, b"The MCP server is stopping", b"text/plain")
            return
        self.on_request(route, scope["method"], {k.decode("latin-1").lower(): v.decode("latin-1")
                                                 for k, v in headers})
        await manager.handle_request({**scope, ROUTE_KEY: route}, receive, send)

    def url_of(self, route: Route) -> str:
        return route_url(self.port, route)


class McpListener:
    """The listener's lifetime: `run` in a nursery serves until `stop`."""

    def __init__(self, gate: McpGate, server: Server[Any, Any], sock: socket.socket,
                 session_idle_timeout: float) -> None:
        self.gate = gate
        self.server = server
        self.sock = sock
        self.session_idle_timeout = session_idle_timeout
        self.port: int = sock.getsockname()[1]
        gate.port = self.port
        self._scope = trio.CancelScope()
        self.stopped = trio.Event()

    def __repr__(self) -> str:
        return f"<McpListener port={self.port} stopped={self.stopped.is_set()}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        config = hypercorn.config.Config()
        config.bind = [f"fd://{os.dup(self.sock.fileno())}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 1.0
        manager = StreamableHTTPSessionManager(self.server,
                                               session_idle_timeout=self.session_idle_timeout)
        try:
            with self._scope:
                async with manager.run():
                    self.gate.manager = manager
                    await hypercorn.trio.serve(self.gate, config,  # type: ignore[arg-type]
                                               shutdown_trigger=trio.sleep_forever,
                                               task_status=task_status)
        finally:
            self.gate.manager = None
            self.sock.close()
            self.stopped.set()
            log.info("MCP listener on port %d stopped", self.port)

    def stop(self) -> None:
        """Stop at once: open MCP streams are cut (their agents reconnect later)."""
        self._scope.cancel()


__all__ = ["McpGate", "McpListener", "origin_loopback", "server_card"]
