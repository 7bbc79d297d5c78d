"""What each MCP tool does (tools.py defines them; server.py routes calls here).

Code runs through the session's one path, `session.executions.execute` (the one `POST
/sessions/{id}/execute` uses): the execution queue, the collector, the history. The request
carries the agent's attribution in its metadata, so the history records who ran it, and the
session's client is sent `executionRequested` just before the request is queued.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

import attrs
from mcp import types

from kallichore_trio import wire
from kallichore_trio.errors import ExecuteFailed, ExecuteTimeout, KallichoreError
from kallichore_trio.mcp.tools import (
    ToolFailure,
    error_result,
    execution_content,
    json_content,
    timeout_seconds,
)
from kallichore_trio.mcp.windows import CommandFailed, WindowBroker
from kallichore_trio.models import ExecuteRequest
from kallichore_trio.session import executions

if TYPE_CHECKING:
    from kallichore_trio.registry import SessionRegistry
    from kallichore_trio.session.session import Session

log = logging.getLogger(__name__)

#: `metadata.attribution.source` of the requests agents run.
AGENT_SOURCE = "agent"


@attrs.frozen
class CallContext:
    """Who calls, and through which view: `/mcp/w/<workspace>` or `.../s/<session>`."""

    workspace_id: str
    #: The session of a kernel's own view; tools default to it and may use no other.
    view_session_id: str | None = None
    agent_name: str | None = None
    agent_version: str | None = None


class ToolCalls:
    def __init__(self, registry: SessionRegistry, broker: WindowBroker) -> None:
        self.registry = registry
        self.broker = broker

    def __repr__(self) -> str:
        return f"<ToolCalls {self.registry!r} {self.broker!r}>"

    async def call(self, ctx: CallContext, name: str,
                   args: dict[str, Any]) -> types.CallToolResult:
        handler = getattr(self, f"_tool_{name}", None)
        if handler is None:
            return error_result(f"Unknown tool {name!r}; see tools/list")
        try:
            content, is_error = await handler(ctx, args)
        except ToolFailure as exc:
            return error_result(str(exc))
        return types.CallToolResult(content=content, isError=is_error)

    # ---- sessions --------------------------------------------------------------------------

    def workspace_sessions(self, workspace_id: str) -> list[Session]:
        """Sessions created for the workspace, and those its windows say they show."""
        known = self.broker.known_session_ids(workspace_id)
        return [s for s in self.registry.sessions.values()
                if s.model.workspace_id == workspace_id or s.session_id in known]

    def _session(self, ctx: CallContext, args: dict[str, Any]) -> Session:
        session_id = args.get("session_id", ctx.view_session_id)
        if not isinstance(session_id, str) or not session_id:
            raise ToolFailure("session_id is required; list_sessions gives the ids")
        if ctx.view_session_id is not None and session_id != ctx.view_session_id:
            raise ToolFailure(f"This endpoint serves session {ctx.view_session_id} only")
        session = self.registry.sessions.get(session_id)
        if session is None or (ctx.view_session_id is None and session not in
                               self.workspace_sessions(ctx.workspace_id)):
            raise ToolFailure(f"Unknown session {session_id!r}; list_sessions gives the "
                              "sessions of this workspace")
        return session

    @staticmethod
    def _runnable(session: Session) -> None:
        if session.status == "exited":
            raise ToolFailure(f"Session {session.session_id} has exited: its kernel is not "
                              "running. Ask the user to restart it, or use another session.")

    async def _tool_list_sessions(self, ctx: CallContext,
                                  args: dict[str, Any]) -> tuple[list[Any], bool]:
        foreground = {w.foreground_session_id for w in self.broker.windows(ctx.workspace_id)}
        if ctx.view_session_id is None:
            sessions = self.workspace_sessions(ctx.workspace_id)
        else:  # a kernel's own view: its session only
            own = self.registry.sessions.get(ctx.view_session_id)
            sessions = [own] if own is not None else []
        listing = [{
            "session_id": s.session_id,
            "display_name": s.model.display_name,
            "language": s.model.language,
            "status": s.status,
            "session_mode": s.model.session_mode,
            "working_directory": s.working_directory,
            "notebook_uri": s.model.notebook_uri,
            "foreground": s.session_id in foreground,
            "queued_executions": len(s.queue.pending) + (s.queue.active is not None),
        } for s in sessions]
        return json_content(listing), False

    # ---- code --------------------------------------------------------------------------------

    async def _tool_execute_code(self, ctx: CallContext,
                                 args: dict[str, Any]) -> tuple[list[Any], bool]:
        return await self._run(ctx, args, tool="execute_code", store_history=True)

    async def _tool_evaluate_code(self, ctx: CallContext,
                                  args: dict[str, Any]) -> tuple[list[Any], bool]:
        return await self._run(ctx, args, tool="evaluate_code", store_history=False)

    async def _run(self, ctx: CallContext, args: dict[str, Any], *, tool: str,
                   store_history: bool) -> tuple[list[Any], bool]:
        session = self._session(ctx, args)
        code = args.get("code")
        if not isinstance(code, str):
            raise ToolFailure("code must be a string")
        timeout = timeout_seconds(args.get("timeout_s"))
        self._runnable(session)
        if tool == "evaluate_code" and args.get("wait") is not True and (
                session.status == "busy" or session.queue.active is not None):
            raise ToolFailure(f"Session {session.session_id} is busy running other code. "
                              "Call evaluate_code again with wait: true to queue behind it, "
                              "or interrupt_session to stop it.")
        attribution = {"source": AGENT_SOURCE, "agent_name": ctx.agent_name,
                       "agent_version": ctx.agent_version, "workspace_id": ctx.workspace_id,
                       "tool": tool}

        def announce(msg_id: str) -> None:
            session.emit(wire.execution_requested_event(
                msg_id=msg_id, code=code, requested_at=dt.datetime.now(dt.UTC),
                source=AGENT_SOURCE, workspace_id=ctx.workspace_id, tool=tool,
                agent_name=ctx.agent_name, agent_version=ctx.agent_version))

        request = ExecuteRequest(code=code, store_history=store_history, timeout_seconds=timeout)
        try:
            result = await executions.execute(
                session, request, metadata={"attribution": {
                    k: v for k, v in attribution.items() if v is not None}},
                announce=announce)
        except ExecuteTimeout:
            raise ToolFailure(
                f"The code did not finish within {timeout:g} s, so the kernel was interrupted. "
                "Pass a longer timeout_s (at most 600), or split the work into shorter "
                "steps.") from None
        except ExecuteFailed as exc:
            if exc.code == "session_not_ready":
                raise ToolFailure(f"Session {session.session_id} has no running kernel "
                                  f"(status {session.status}). Ask the user to start or restart "
                                  "it.") from None
            raise ToolFailure(f"The code could not run to the end: {exc.message}") from None
        return execution_content(result)

    async def _tool_interrupt_session(self, ctx: CallContext,
                                      args: dict[str, Any]) -> tuple[list[Any], bool]:
        session = self._session(ctx, args)
        self._runnable(session)
        try:
            await session.interrupt()
        except KallichoreError as exc:
            raise ToolFailure(f"Could not interrupt session {session.session_id}: "
                              f"{exc.message}") from None
        return [types.TextContent(type="text", text=f"Interrupted session "
                                                    f"{session.session_id}.")], False

    # ---- Positron commands -------------------------------------------------------------------

    async def _tool_list_positron_commands(self, ctx: CallContext,
                                           args: dict[str, Any]) -> tuple[list[Any], bool]:
        window = self.broker.target(ctx.workspace_id)
        if window is None:
            raise ToolFailure("No Positron window is attached to this workspace, so no "
                              "commands are available. Open the workspace in Positron, with "
                              "MCP enabled, and try again.")
        return json_content(window.commands), False

    async def _tool_run_positron_command(self, ctx: CallContext,
                                         args: dict[str, Any]) -> tuple[list[Any], bool]:
        command_id = args.get("command_id")
        if not isinstance(command_id, str) or not command_id:
            raise ToolFailure("command_id is required; list_positron_commands gives the ids")
        try:
            result = await self.broker.run_command(
                ctx.workspace_id, command_id, args.get("args"),
                agent_name=ctx.agent_name, agent_version=ctx.agent_version)
        except CommandFailed as exc:
            raise ToolFailure(str(exc)) from None
        return json_content(result), False


__all__ = ["AGENT_SOURCE", "CallContext", "ToolCalls"]
