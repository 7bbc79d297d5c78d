"""GET /sessions/{id}/channels: the session's client channel.

TCP: a WebSocket upgrade on the API port, served by Quart. Socket transport: the call returns
the path of a per-session Unix socket that accepts a WebSocket (with an HTTP upgrade on any
path, or raw framing) and serves it with `wsconn`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio
from quart import Quart, Response, websocket

from kallichore_trio.api.hypercorn_ext import EXTENSION, WebSocketControl
from kallichore_trio.api.responses import authenticated, error_response, json_response
from kallichore_trio.errors import SessionNotFound, SocketPathError
from kallichore_trio.session.session import KernelSession
from kallichore_trio.wsconn import (
    ClientConnection,
    ClientGone,
    SocketPathTooLong,
    default_socket_dir,
    serve_unix_socket,
    session_socket_path,
)

if TYPE_CHECKING:
    from kallichore_trio.daemon import Daemon

log = logging.getLogger(__name__)


class QuartConnection:
    """The ClientConnection of a Quart WebSocket (TCP transport).

    Everything goes through the stream's WebSocketControl (api.hypercorn_ext): client messages
    straight from Hypercorn, frames out in batches, Pings we count the Pongs of, and an abort
    for a client that stops reading. Quart only accepts the upgrade and closes.
    """

    def __init__(self, control: WebSocketControl) -> None:
        self._control = control

    def __repr__(self) -> str:
        return f"<QuartConnection {self._control!r}>"

    @property
    def last_pong(self) -> bytes | None:
        return self._control.last_pong

    async def send_text(self, text: str) -> None:
        await self.send_texts((text,))

    async def send_texts(self, texts: Sequence[str]) -> None:
        if not await self._control.send_texts(texts):
            raise ClientGone("the WebSocket connection is closed")

    async def receive_text(self) -> str | None:
        # Binary frames are ignored: buffers travel base64-encoded inside the JSON.
        text = await self._control.receive_text()
        return text or None  # an empty text frame closes, as in the reference

    async def ping(self, payload: bytes) -> None:
        if not await self._control.ping(payload):
            raise ClientGone("the WebSocket connection is closed")

    async def abort(self) -> None:
        await self._control.abort()

    async def close(self) -> None:
        if not self._control.usable:
            return
        try:
            await websocket.close(1000)
        except (RuntimeError, ClientGone):
            pass


def register(app: Quart, daemon: Daemon) -> None:
    registry = daemon.registry

    @app.websocket("/sessions/<session_id>/channels")
    async def channels_websocket(session_id: str) -> Response | None:
        try:
            session = registry.get(
                session_id,
                details="Establishing a websocket connection requires a valid session ID",
            )
        except SessionNotFound as exc:
            # 400, not 404, as the reference answers an upgrade for an unknown session.
            return json_response(exc.to_dict(), 400)
        control = websocket.scope["extensions"].get(EXTENSION)
        if control is None:  # Hypercorn without api.hypercorn_ext.install(): not a supported setup
            return json_response(
                {"code": "500", "message": "WebSocket control is not installed"}, 500)
        await websocket.accept()
        await session.serve_client(QuartConnection(control))
        return None

    @app.get("/sessions/<session_id>/channels")
    @authenticated(daemon.config.token)
    async def channels_socket(session_id: str) -> Response:
        session = registry.get(session_id)
        if daemon.config.transport != "socket":
            return json_response(
                {"code": "400", "message": "Use a WebSocket upgrade to connect on TCP"}, 400
            )
        try:
            path = await open_session_socket(daemon, session)
        except SocketPathError as exc:
            return error_response(exc)
        return json_response(str(path))


async def open_session_socket(daemon: Daemon, session: KernelSession) -> os.PathLike[str]:
    """A fresh per-session socket; the previous listener of that session is closed."""
    try:
        path = session_socket_path(default_socket_dir(daemon.config), session.session_id,
                                   os.getpid())
    except SocketPathTooLong as exc:
        raise SocketPathError("socket_path_too_long", str(exc)) from None
    old = daemon.socket_listeners.pop(session.session_id, None)
    if old is not None:
        old.cancel()

    async def handler(conn: ClientConnection) -> None:
        session.socket_path = str(path)
        await session.serve_client(conn)

    async def listen(task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            daemon.socket_listeners[session.session_id] = scope
            await serve_unix_socket(
                path, handler, sniff_timeout=daemon.config.timeouts.socket_sniff,
                task_status=task_status,
            )

    try:
        await session.start_task(listen)
    except OSError as exc:
        raise SocketPathError("domain_socket_error", f"Failed to bind {path}: {exc}") from None
    return path


__all__ = ["QuartConnection", "register"]
