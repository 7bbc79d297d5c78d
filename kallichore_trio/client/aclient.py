"""AsyncClient: the daemon's HTTP API on Trio, typed with the project's models.

    async with AsyncClient.find() as kc:          # or from_connection_file / from_url
        session = await kc.start_kernel("python3")
        result = await session.execute("print(6 * 7)")

`async with` opens the nursery the sessions' channel readers run in; leaving it closes the
channels (kernels keep running unless shut down). Every call has a timeout (`Timeouts`, scaled
by `timeout_scale`); errors are `kallichore_trio.client.errors`.
"""

from __future__ import annotations

import math
import os
import uuid
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import attrs
import httpx
import trio

from kallichore_trio.client import discovery, kernelspecs
from kallichore_trio.client.errors import (
    ClientError,
    ClientTimeout,
    DaemonNotFound,
    SessionNotFound,
    error_for_response,
)
from kallichore_trio.client.session import AsyncSession
from kallichore_trio.models import (
    ActiveSession,
    ConnectionInfo,
    HistoryEntry,
    NewSession,
    ServerConfiguration,
    ServerStatus,
    SessionList,
    VarAction,
    converter,
)

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class Timeouts:
    """Default bounds, in seconds, before `timeout_scale` applies."""

    request: float = 30.0  # an HTTP call, opening a channel
    start: float = 120.0  # a kernel coming up (start, restart)
    reply: float = 30.0  # a kernel's reply to a request (complete, inspect, ...)
    execute: float = 300.0  # one execution
    stop: float = 30.0  # a killed kernel to exit
    interrupted: float = 10.0  # an interrupted execution to end (its reply and idle)
    reconnect: float = 30.0  # a lost channel to be resumed (attempts with backoff within it)


class AsyncClient:
    def __init__(self, address: discovery.ServerAddress, *, timeout_scale: float = 1.0,
                 timeouts: Timeouts | None = None, resume: bool = True) -> None:
        self.address = address
        #: Ask the daemon to number the channels' frames, and resume lost connections
        #: (docs/client.md, "Resuming a broken channel").
        self.resume = resume
        self.timeout_scale = timeout_scale
        self.timeouts = timeouts or Timeouts()
        self._sessions: dict[str, AsyncSession] = {}
        self._stack: AsyncExitStack | None = None
        self._http_client: httpx.AsyncClient | None = None
        self._nursery_ref: trio.Nursery | None = None

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_connection_file(cls, path: str | os.PathLike[str], **kw: Any) -> AsyncClient:
        return cls(discovery.from_connection_file(path), **kw)

    @classmethod
    def from_url(cls, url: str, token: str | None, **kw: Any) -> AsyncClient:
        """`url` is `http://127.0.0.1:<port>` or `unix:<path of the API socket>`."""
        return cls(discovery.find_server(url=url, token=token), **kw)

    @classmethod
    def find(cls, connection_file: str | os.PathLike[str] | None = None, **kw: Any
             ) -> AsyncClient:
        """From connection_file, else $KALLICHORE_CONNECTION_FILE, else the newest running
        kcserver's default connection file."""
        return cls(discovery.find_server(connection_file), **kw)

    async def __aenter__(self) -> AsyncClient:
        async with AsyncExitStack() as stack:
            transport = (httpx.AsyncHTTPTransport(uds=self.address.uds)
                         if self.address.uds is not None else None)
            headers = ({"Authorization": f"Bearer {self.address.token}"}
                       if self.address.token is not None else {})
            self._http_client = await stack.enter_async_context(httpx.AsyncClient(
                base_url=self.address.base_url, transport=transport, headers=headers,
                timeout=self._timeout(None, "request")))
            self._nursery_ref = await stack.enter_async_context(trio.open_nursery())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stack is not None
        try:
            for session in list(self._sessions.values()):
                with trio.CancelScope(shield=True):
                    await session.close()
            assert self._nursery_ref is not None
            self._nursery_ref.cancel_scope.cancel()
        finally:
            stack, self._stack = self._stack, None
            await stack.__aexit__(*exc)

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._http_client is None:
            raise ClientError("use the client in `async with` (or the sync Client)")
        return self._http_client

    @property
    def _nursery(self) -> trio.Nursery:
        if self._nursery_ref is None:
            raise ClientError("use the client in `async with` (or the sync Client)")
        return self._nursery_ref

    def _timeout(self, value: float | None, kind: str) -> float:
        if value is not None:
            return value
        return getattr(self.timeouts, kind) * self.timeout_scale

    # ---- HTTP ----------------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, what: str, session_id: str | None = None,
                    json: Any = None, timeout: float | None = None) -> Any:
        timeout = self._timeout(timeout, "request")
        try:
            response = await self._http.request(
                method, path, json=json,
                timeout=httpx.Timeout(timeout) if math.isfinite(timeout) else None)
        except httpx.TimeoutException:
            raise ClientTimeout(f"{what}: no answer from the daemon at "
                                f"{self.address.describe()} within {timeout:g} s") from None
        except httpx.TransportError as exc:
            raise DaemonNotFound(f"{what}: cannot reach the daemon at "
                                 f"{self.address.describe()}: {exc}") from None
        if response.status_code >= 400:
            raise error_for_response(response, what=what, session_id=session_id)
        return response.json() if response.content else None

    def _structure(self, value: Any, cls: type[T]) -> T:
        return converter.structure(value, cls)

    # ---- server --------------------------------------------------------------------------

    async def status(self) -> ServerStatus:
        return self._structure(await self._call("GET", "/status", what="server status"),
                               ServerStatus)

    async def configuration(self) -> ServerConfiguration:
        return self._structure(await self._call("GET", "/server_configuration",
                                                what="server configuration"),
                               ServerConfiguration)

    async def set_configuration(self, configuration: ServerConfiguration) -> None:
        await self._call("POST", "/server_configuration", what="set server configuration",
                         json=converter.unstructure(configuration))

    async def shutdown(self) -> None:
        """Stop every kernel, then the daemon."""
        await self._call("POST", "/shutdown", what="shut the daemon down")

    # ---- sessions ------------------------------------------------------------------------

    async def sessions(self) -> list[ActiveSession]:
        listing = await self._call("GET", "/sessions", what="list sessions")
        return self._structure(listing, SessionList).sessions

    async def session_info(self, session_id: str) -> ActiveSession:
        return self._structure(
            await self._call("GET", f"/sessions/{_q(session_id)}", session_id=session_id,
                             what=f"get session {session_id}"), ActiveSession)

    def session(self, session_id: str) -> AsyncSession:
        """The handle of an existing session (one per id and client): its channel opens on
        first use."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = AsyncSession(self, session_id)
        return session

    async def create_session(self, new: NewSession) -> AsyncSession:
        await self._call("PUT", "/sessions", what=f"create session {new.session_id}",
                         json=converter.unstructure(new))
        return self.session(new.session_id)

    async def start(self, session_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Start the kernel; returns its kernel_info_reply content. StartupFailed carries the
        kernel's output and exit code."""
        info = await self._call("POST", f"/sessions/{_q(session_id)}/start",
                                session_id=session_id, what=f"start session {session_id}",
                                timeout=self._timeout(timeout, "start"))
        return info if isinstance(info, dict) else {}

    async def restart(self, session_id: str, *, working_directory: str | None = None,
                      env: dict[str, str] | None = None, timeout: float | None = None) -> None:
        body: dict[str, Any] = {}
        if working_directory is not None:
            body["working_directory"] = working_directory
        if env is not None:
            body["env"] = [converter.unstructure(VarAction("replace", k, v))
                           for k, v in env.items()]
        await self._call("POST", f"/sessions/{_q(session_id)}/restart", json=body,
                         session_id=session_id, what=f"restart session {session_id}",
                         timeout=self._timeout(timeout, "start"))

    async def interrupt(self, session_id: str) -> None:
        await self._call("POST", f"/sessions/{_q(session_id)}/interrupt",
                         session_id=session_id, what=f"interrupt session {session_id}")

    async def kill(self, session_id: str) -> None:
        await self._call("POST", f"/sessions/{_q(session_id)}/kill", session_id=session_id,
                         what=f"kill session {session_id}")

    async def delete(self, session_id: str) -> None:
        """Remove a session whose kernel is not running (SessionRunning otherwise)."""
        await self._call("DELETE", f"/sessions/{_q(session_id)}", session_id=session_id,
                         what=f"delete session {session_id}")
        session = self._sessions.pop(session_id, None)
        if session is not None:
            await session.close()

    async def adopt(self, session_id: str, connection_info: ConnectionInfo,
                    timeout: float | None = None) -> dict[str, Any]:
        info = await self._call("PUT", f"/sessions/{_q(session_id)}/adopt",
                                json=converter.unstructure(connection_info),
                                session_id=session_id, what=f"adopt a kernel as {session_id}",
                                timeout=self._timeout(timeout, "start"))
        return info if isinstance(info, dict) else {}

    async def connection_info(self, session_id: str) -> ConnectionInfo:
        return self._structure(
            await self._call("GET", f"/sessions/{_q(session_id)}/connection_info",
                             session_id=session_id,
                             what=f"connection info of session {session_id}"), ConnectionInfo)

    async def history(self, session_id: str) -> list[HistoryEntry]:
        entries = await self._call("GET", f"/sessions/{_q(session_id)}/history",
                                   session_id=session_id,
                                   what=f"history of session {session_id}")
        return [self._structure(e, HistoryEntry) for e in entries]

    async def channels_path(self, session_id: str) -> str:
        """Socket transport: the path of the session's own Unix socket."""
        path = await self._call("GET", f"/sessions/{_q(session_id)}/channels",
                                session_id=session_id,
                                what=f"channel socket of session {session_id}")
        if not isinstance(path, str):
            raise ClientError(f"session {session_id}: the daemon answered {path!r} for the "
                              "channel socket path")
        return path

    async def start_kernel(self, kernelspec: str | None = None, *,
                           session_id: str | None = None, argv: list[str] | None = None,
                           working_directory: str | None = None,
                           env: dict[str, str] | None = None, display_name: str | None = None,
                           language: str | None = None, timeout: float | None = None,
                           connection_timeout: int | None = None) -> AsyncSession:
        """Create and start a session: from a kernelspec by name (JUPYTER_PATH respected), an
        explicit argv, or by default this interpreter's ipykernel. A session that fails to
        start is removed, and StartupFailed says why."""
        session_id = session_id or f"{kernelspec or 'python'}-{uuid.uuid4().hex[:8]}"
        new = kernelspecs.new_session(
            session_id, kernelspec=kernelspec, argv=argv, working_directory=working_directory,
            env=env, display_name=display_name, language=language,
            connection_timeout=connection_timeout)
        session = await self.create_session(new)
        try:
            await self.start(session_id, timeout=timeout)
        except ClientError:
            with trio.CancelScope(shield=True), trio.move_on_after(
                    self._timeout(None, "request")):
                await self.remove_session(session_id)
            raise
        return session

    async def remove_session(self, session_id: str, timeout: float | None = None) -> None:
        """Kill the kernel if it runs, wait until it exited, delete the session. A session
        already gone is fine."""
        timeout = self._timeout(timeout, "stop")
        try:
            info = await self.session_info(session_id)
            if info.status not in ("exited", "uninitialized"):
                try:
                    await self.kill(session_id)
                except ClientError:
                    pass  # it exited meanwhile: the wait below sees it
                with trio.move_on_after(timeout):
                    while (await self.session_info(session_id)).status not in (
                            "exited", "uninitialized"):
                        await trio.sleep(0.05)
                    await self.delete(session_id)
                    return
                raise ClientTimeout(f"session {session_id}: the kernel did not exit within "
                                    f"{timeout:g} s of being killed")
            await self.delete(session_id)
        except SessionNotFound:
            self._sessions.pop(session_id, None)


def _q(session_id: str) -> str:
    from urllib.parse import quote

    return quote(session_id, safe="")
