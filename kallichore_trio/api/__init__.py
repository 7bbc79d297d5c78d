"""The HTTP API: a Quart-Trio app whose routes are thin calls into the daemon's registry.

Who may call it is decided in one place, the `guard_*` hooks, which run before routing for
every request and WebSocket upgrade (security.py; docs/security.md): a route that is added
later is covered without doing anything.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from kallichore_trio.api import channels, mcp, server, sessions
from kallichore_trio.api.responses import empty, error_response, startup_error_response, text
from kallichore_trio.errors import KallichoreError, StartupFailure
from kallichore_trio.models import BodyError
from kallichore_trio.security import Refusal, check_request, policy_for, requires_token

if TYPE_CHECKING:
    from kallichore_trio.daemon import Daemon

log = logging.getLogger(__name__)


def create_app(daemon: Daemon) -> QuartTrio:
    # No static folder: the API serves no files, and a route that could is one too many.
    app = QuartTrio("kallichore_trio", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 256 * 1024 * 1024
    app.config["BODY_TIMEOUT"] = 60
    sessions.register(app, daemon)
    server.register(app, daemon)
    channels.register(app, daemon)
    mcp.register(app, daemon)
    policy = policy_for(daemon.config, tcp=daemon.config.transport == "tcp")

    def refused(refusal: Refusal, what: str) -> Response:
        # Never the headers: a wrong token may be a real one (another server's). The path
        # as repr, so that a client cannot forge log lines with an encoded newline.
        log.warning("refused %s: %s", what, refusal.reason)
        if refusal.status == 401:
            return empty(401)
        return text(refusal.reason, refusal.status)

    # Quart runs these before it raises routing errors, so an unknown path or session answers
    # exactly as a known one does to a client without the token.
    @app.before_request
    async def guard_request() -> Response | None:
        refusal = check_request(policy, request.headers.items(),
                                token_required=requires_token(request.method, request.path))
        return None if refusal is None else refused(
            refusal, f"{request.method} {request.path!r}")

    @app.before_websocket
    async def guard_websocket() -> Response | None:
        refusal = check_request(policy, websocket.headers.items(), token_required=True)
        return None if refusal is None else refused(
            refusal, f"WebSocket upgrade {websocket.path!r}")

    @app.errorhandler(KallichoreError)
    async def kallichore_error(exc: KallichoreError) -> Response:
        return error_response(exc)

    @app.errorhandler(StartupFailure)
    async def startup_failure(exc: StartupFailure) -> Response:
        log.warning("startup failed: %s", exc)
        return startup_error_response(exc)

    @app.errorhandler(BodyError)
    async def body_error(exc: BodyError) -> Response:
        return text(str(exc), 400)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        # Unknown path: 404, known path with the wrong method: 405; both with empty bodies.
        return empty(exc.code or 500)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Any:
        log.exception("internal error while handling a request")
        return text("An internal error occurred", 500)

    return app
