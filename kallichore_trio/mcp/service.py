"""McpService: the daemon's MCP subsystem, one object the routes and the daemon talk to.

It owns the workspaces, the windows broker and the listener, which runs (in the nursery the
daemon gives) while at least one workspace is registered. The listener, the SDK's server and the
tool calls it serves are built by `_new_listener`, the one place that imports the SDK's side of
the package: a daemon with no workspace never loads the SDK. docs/mcp.md.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from kallichore_trio.config import Config
from kallichore_trio.errors import KallichoreError
from kallichore_trio.mcp.address import ListenerFailed, Route, bind_loopback
from kallichore_trio.mcp.windows import WindowBroker
from kallichore_trio.mcp.workspaces import Workspace, WorkspaceBook
from kallichore_trio.models import McpClient, McpStatus, McpWorkspace

if TYPE_CHECKING:
    import socket

    from kallichore_trio.mcp.listener import McpListener
    from kallichore_trio.mcp.server import CallerInfo
    from kallichore_trio.registry import SessionRegistry
    from kallichore_trio.session.session import Session

log = logging.getLogger(__name__)

#: Agents listed per workspace in /status (the most recently seen).
CLIENTS_LISTED = 64
#: Headers the stdio relay (and any client that wants to) sends to say who the agent is.
PID_HEADER = "x-kallichore-client-pid"
CWD_HEADER = "x-kallichore-client-cwd"
#: A stateful MCP session with no request for this long is closed by the listener (the agent
#: starts another), and its agent leaves /status's list.
SESSION_IDLE_TIMEOUT = 30 * 60.0


class McpListenerFailed(KallichoreError):
    code, http_status = "mcp_listener_failed", 400


@attrs.define(eq=False)
class SeenClient:
    id: int
    workspace_id: str
    connected_at: dt.datetime
    last_seen: float
    name: str | None
    version: str | None
    pid: int | None
    working_directory: str | None
    session_id: str | None


class McpService:
    def __init__(self, config: Config, registry: SessionRegistry, nursery: trio.Nursery,
                 on_activity: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.registry = registry
        self._nursery = nursery
        self.on_activity = on_activity
        self.book = WorkspaceBook()
        self.broker = WindowBroker(find_timeout=config.timeouts.mcp_window_wait,
                                   reply_timeout=config.timeouts.mcp_command_reply)
        self.listener: McpListener | None = None
        #: The listener being stopped, until its port is free again.
        self._stopping: McpListener | None = None
        self.request_count = 0
        self._clients: dict[str, SeenClient] = {}  # by MCP session id
        self._client_ids = itertools.count(1)
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<McpService {self.book!r} {self.listener!r}>"

    # ---- workspaces (the REST routes) --------------------------------------------------------

    async def register(self, *, workspace_id: str | None, display_name: str,
                       preferred_port: int | None, token: str | None) -> dict[str, Any]:
        """Register (or re-register) a workspace, starting the listener if needed; the
        `POST /mcp/workspaces` answer. ValueError for a malformed id or token."""
        async with self._lock:
            listener = self.listener
            if listener is None or listener.stopped.is_set():
                listener = await self._start_listener(preferred_port)
            workspace = self.book.register(workspace_id=workspace_id,
                                           display_name=display_name, token=token)
        log.info("MCP workspace %s (%s) registered", workspace.id, display_name)
        return {"workspace_id": workspace.id, "token": workspace.token, "port": listener.port,
                "url": self.workspace_url(workspace.id)}

    async def deregister(self, workspace_id: str) -> bool:
        async with self._lock:
            if self.book.remove(workspace_id) is None:
                return False
            self.broker.drop_workspace(workspace_id)
            for key, client in list(self._clients.items()):
                if client.workspace_id == workspace_id:
                    del self._clients[key]
            log.info("MCP workspace %s deregistered", workspace_id)
            if not len(self.book):
                self.stop()
            return True

    def workspace(self, workspace_id: str) -> Workspace | None:
        return self.book.get(workspace_id)

    def workspace_url(self, workspace_id: str) -> str:
        assert self.listener is not None
        return self.listener.gate.url_of(Route(workspace_id))

    async def _start_listener(self, preferred_port: int | None) -> McpListener:
        stopping = self._stopping
        if stopping is not None:
            # Re-registered just after the last deregistration: let the old listener free
            # its port, so that the preferred port (the one Positron kept) can be had again.
            with trio.move_on_after(2.0):
                await stopping.stopped.wait()
            self._stopping = None
        try:
            sock = bind_loopback(preferred_port)
        except ListenerFailed as exc:
            raise McpListenerFailed(f"The MCP listener could not start: {exc}") from None
        try:
            listener = await trio.to_thread.run_sync(self._new_listener, sock)
            await self._nursery.start(listener.run)
        except BaseException:
            sock.close()  # the listener's run closes it too once started: closing is idempotent
            raise
        self.listener = listener
        log.info("MCP listener on 127.0.0.1:%d", listener.port)
        return listener

    def _new_listener(self, sock: socket.socket) -> McpListener:
        """The SDK-backed parts: the tool calls, the SDK's server, the listener and its gate.

        Their modules are imported here, at the first registration, rather than with this one:
        they bring the MCP SDK and with it pydantic, starlette, sse-starlette, httpx and anyio's
        extras, hundreds of modules and a third of an idle daemon's memory (docs/performance.md),
        which a daemon whose user never registers a workspace would carry for nothing.

        Called in a worker thread, because the first call's import would otherwise hold up the
        event loop, and with it every session's traffic, for a noticeable time
        (docs/performance-journal.md); it only imports and builds objects, none of which
        touches the event loop until `run`.
        """
        from kallichore_trio.mcp.calls import ToolCalls
        from kallichore_trio.mcp.listener import McpGate, McpListener
        from kallichore_trio.mcp.server import build_server

        gate = McpGate(self.book, lambda sid: sid in self.registry.sessions, self._on_request)
        server = build_server(ToolCalls(self.registry, self.broker), self._on_call)
        return McpListener(gate, server, sock, SESSION_IDLE_TIMEOUT)

    def stop(self) -> None:
        """Stop the listener (the last workspace went, or the daemon is stopping: then the
        windows still attached are let go too, and commands waiting on them fail)."""
        for workspace_id in list(self.book.workspaces):
            self.broker.drop_workspace(workspace_id)
        if self.listener is not None:
            self.listener.stop()
            self._stopping = self.listener
            self.listener = None
        self._clients.clear()

    # ---- calls (from the listener) ---------------------------------------------------------

    def _on_request(self, route: Route, method: str, headers: dict[str, str]) -> None:
        self.request_count += 1
        self.on_activity()
        session_id = headers.get("mcp-session-id")
        client = self._clients.get(session_id) if session_id is not None else None
        if client is not None and method == "DELETE":
            del self._clients[session_id]  # the agent ended its MCP session
        elif client is not None:
            client.last_seen = trio.current_time()

    def _on_call(self, caller: CallerInfo) -> None:
        """A tools/list or tools/call: the agent is active (idle shutdown) and is listed."""
        self.on_activity()
        key = caller.mcp_session_id
        if key is None:
            return
        now = trio.current_time()
        client = self._clients.get(key)
        if client is None:
            pid = caller.headers.get(PID_HEADER, "")
            client = self._clients[key] = SeenClient(
                next(self._client_ids), caller.route.workspace_id, dt.datetime.now(dt.UTC),
                now, caller.name, caller.version, int(pid) if pid.isdigit() else None,
                caller.headers.get(CWD_HEADER), caller.route.session_id)
        client.last_seen = now
        self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        for key, client in list(self._clients.items()):
            if now - client.last_seen > SESSION_IDLE_TIMEOUT:
                del self._clients[key]

    # ---- the daemon's views ------------------------------------------------------------------

    def status(self) -> McpStatus:
        self._forget_idle(trio.current_time())
        listener = self.listener
        workspaces = []
        for workspace in self.book.workspaces.values():
            clients = sorted((c for c in self._clients.values()
                              if c.workspace_id == workspace.id), key=lambda c: c.id)
            workspaces.append(McpWorkspace(
                id=workspace.id, display_name=workspace.display_name,
                connected=bool(self.broker.windows(workspace.id)),
                clients=[McpClient(id=c.id, connected_at=c.connected_at, name=c.name,
                                   version=c.version, pid=c.pid,
                                   working_directory=c.working_directory,
                                   session_id=c.session_id)
                         for c in clients[-CLIENTS_LISTED:]]))
        return McpStatus(active=listener is not None,
                         port=listener.port if listener is not None else None,
                         request_count=self.request_count, workspaces=workspaces)

    def kernel_env(self, session: Session) -> dict[str, str]:
        """POSITRON_MCP_URL and POSITRON_MCP_TOKEN for a kernel of a workspace's session."""
        workspace_id = session.model.workspace_id
        workspace = self.book.get(workspace_id) if workspace_id else None
        if workspace is None or self.listener is None:
            return {}
        url = self.listener.gate.url_of(Route(workspace.id, session.session_id))
        return {"POSITRON_MCP_URL": url, "POSITRON_MCP_TOKEN": workspace.token}


__all__ = ["McpListenerFailed", "McpService"]
