"""Server-wide routes: /status, /shutdown, /client_heartbeat, /server_configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from quart import Quart, Response

from kallichore_trio.api.responses import json_response, read_body, with_warning
from kallichore_trio.models import ClientHeartbeat, ServerConfiguration

if TYPE_CHECKING:
    from kallichore_trio.daemon import Daemon


def register(app: Quart, daemon: Daemon) -> None:
    @app.get("/status")
    async def server_status() -> Response:
        return json_response(attrs.evolve(daemon.registry.status(), mcp=daemon.mcp.status()))

    @app.post("/shutdown")
    async def shutdown_server() -> Response:
        daemon.request_shutdown("POST /shutdown")
        return json_response(None)

    @app.post("/client_heartbeat")
    async def client_heartbeat() -> Response:
        body = await read_body(ClientHeartbeat, "ClientHeartbeat")
        daemon.client_heartbeat(body.value.process_id)
        return with_warning(json_response(None), body.ignored)

    @app.get("/server_configuration")
    async def get_server_configuration() -> Response:
        return json_response(daemon.server_configuration())

    @app.post("/server_configuration")
    async def set_server_configuration() -> Response:
        body = await read_body(ServerConfiguration, "ServerConfiguration")
        daemon.configure(body.value)
        return with_warning(json_response(None), body.ignored)
