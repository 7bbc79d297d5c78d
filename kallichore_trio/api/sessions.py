"""Routes under /sessions: thin calls into the registry and the session."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Quart, Response

from kallichore_trio.api.responses import (
    json_response,
    read_body,
    with_warning,
)
from kallichore_trio.models import (
    ConnectionInfo,
    ExecuteRequest,
    NewSession,
    NewSessionResponse,
    RestartSession,
    SessionList,
)
from kallichore_trio.session import executions, view

if TYPE_CHECKING:
    from kallichore_trio.daemon import Daemon


def register(app: Quart, daemon: Daemon) -> None:
    registry = daemon.registry

    @app.get("/sessions")
    async def list_sessions() -> Response:
        sessions = [view.active_session(s) for s in registry.sessions.values()]
        return json_response(SessionList(total=len(sessions), sessions=sessions))

    @app.put("/sessions")
    async def new_session() -> Response:
        body = await read_body(NewSession, "NewSession")
        session = await registry.create(body.value)
        return with_warning(json_response(NewSessionResponse(session.session_id)), body.ignored)

    @app.get("/sessions/<session_id>")
    async def get_session(session_id: str) -> Response:
        return json_response(view.active_session(registry.get(session_id)))

    @app.delete("/sessions/<session_id>")
    async def delete_session(session_id: str) -> Response:
        registry.delete(session_id)
        return json_response(None)

    @app.post("/sessions/<session_id>/start")
    async def start_session(session_id: str) -> Response:
        return json_response(await registry.get(session_id).start())

    @app.post("/sessions/<session_id>/restart")
    async def restart_session(session_id: str) -> Response:
        session = registry.get(session_id)
        try:
            body = (await read_body(RestartSession, "RestartSession", required=False)).value
        except ValueError:
            body = None  # the reference treats a restart body it cannot parse as absent
        await session.restart(
            body.working_directory if body else None, body.env if body else None
        )
        return json_response(None)

    @app.post("/sessions/<session_id>/kill")
    async def kill_session(session_id: str) -> Response:
        registry.get(session_id).kill()
        return json_response(None)

    @app.post("/sessions/<session_id>/interrupt")
    async def interrupt_session(session_id: str) -> Response:
        await registry.get(session_id).interrupt()
        return json_response(None)

    @app.put("/sessions/<session_id>/adopt")
    async def adopt_session(session_id: str) -> Response:
        session = registry.get(session_id)
        body = await read_body(ConnectionInfo, "ConnectionInfo")
        return with_warning(json_response(await session.adopt(body.value)), body.ignored)

    @app.get("/sessions/<session_id>/connection_info")
    async def connection_info(session_id: str) -> Response:
        return json_response(registry.get(session_id).get_connection_info())


    @app.post("/sessions/<session_id>/execute")
    async def execute(session_id: str) -> Response:
        session = registry.get(session_id)
        body = await read_body(ExecuteRequest, "ExecuteRequest")
        result = await executions.execute(session, body.value)
        return with_warning(json_response(result), body.ignored)

    @app.get("/sessions/<session_id>/history")
    async def history(session_id: str) -> Response:
        return json_response(list(registry.get(session_id).executions.history))
