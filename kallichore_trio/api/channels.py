"""GET /sessions/{id}/channels: the session's client channel.

TCP: a WebSocket upgrade on the API port, accepted by Quart and then served as a
`transport.websocket.WsprotoConnection` on the TCP stream Hypercorn hands over
(transport/hypercorn_ext.py). Socket transport: the call returns the path of the session's own
Unix socket, bound on the first call and kept until the session ends; it accepts a WebSocket (an
HTTP upgrade on any path, carrying the bearer token) and serves it the same way
(transport/unix.py). Both upgrades are authorized before anything else (the guard hooks of
api/__init__.py and the listener's `authorize`, security.py). On both, a client is evicted when
the next one connects (serve_client), and a client may ask to resume with `?resume=N` on its
upgrade request (docs/durability.md); a bad value is refused with 400 before the upgrade.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from quart import Quart, Response, websocket

from kallichore_trio import wire
from kallichore_trio.api.responses import error_response, json_response
from kallichore_trio.errors import SessionNotFound, SocketPathError
from kallichore_trio.session.session import Session
from kallichore_trio.transport.hypercorn_ext import EXTENSION
from kallichore_trio.transport.unix import (
    SocketPathTooLong,
    default_socket_dir,
    session_socket_path,
)

if TYPE_CHECKING:
    from kallichore_trio.daemon import Daemon

log = logging.getLogger(__name__)


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
        try:
            resume = wire.parse_resume(websocket.args.getlist("resume"))
        except wire.ResumeError as exc:
            return json_response({"code": "400", "message": str(exc)}, 400)
        handover = websocket.scope["extensions"].get(EXTENSION)
        if handover is None:  # Hypercorn without hypercorn_ext.install(): not supported
            return json_response(
                {"code": "500", "message": "WebSocket handover is not installed"}, 500)
        await websocket.accept()
        # From here the connection is ours, served like a Unix socket client.
        conn = await handover.take_over()
        if conn is None:
            log.debug("session %s: client left during the WebSocket upgrade", session_id)
            return None
        try:
            await session.serve_client(conn, resume=resume)
        finally:
            await conn.close()
        return None

    @app.get("/sessions/<session_id>/channels")
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


#: One number per per-session socket this process binds: it makes every path unique, even
#: for sessions whose ids share their first 8 bytes or a session re-created under an old id.
_socket_serials = itertools.count(1)


async def open_session_socket(daemon: Daemon, session: Session) -> Path:
    """The session's socket path, bound on the first call (Session.channel_socket)."""
    socket_dir = default_socket_dir(daemon.config)
    tried: list[Path] = []

    def new_path() -> Path:
        path = session_socket_path(socket_dir, session.session_id, os.getpid(),
                                   next(_socket_serials))
        tried.append(path)
        return path

    try:
        return await session.channel_socket(new_path)
    except SocketPathTooLong as exc:
        raise SocketPathError("socket_path_too_long", str(exc)) from None
    except OSError as exc:
        where = tried[-1] if tried else socket_dir
        raise SocketPathError("domain_socket_error", f"Failed to bind {where}: {exc}") from None


__all__ = ["register"]
