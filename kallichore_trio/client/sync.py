"""Client and Session: the synchronous facade, for plain pytest and scripts.

Why a private thread running one Trio loop (rather than `trio.run` per call): a session's
channel is a live connection that must stay open between calls. It keeps the kernel events and
messages that arrive between two calls, it answers the daemon's keep-alive pings, and reopening
it per call would evict and re-attach each time (one client per session, docs/protocol.md §4.5).
A loop per call cannot hold a connection; a loop in a thread can, and each call is handed to
it with `trio.from_thread.run`. The thread is a daemon thread ended by `close()` (or the `with`
block); the client's objects must not be shared with another Trio loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import trio

from kallichore_trio.client import discovery
from kallichore_trio.client import messages as m
from kallichore_trio.client.aclient import AsyncClient, Timeouts
from kallichore_trio.client.errors import ClientError
from kallichore_trio.client.results import ExecutionResult
from kallichore_trio.client.session import AsyncSession, Comm, ExecutionStream, InputHandler
from kallichore_trio.models import (
    ActiveSession,
    ConnectionInfo,
    HistoryEntry,
    NewSession,
    ServerConfiguration,
    ServerStatus,
)

T = TypeVar("T")
#: How long close() waits for the loop thread to finish.
_JOIN_TIMEOUT = 30.0


class _LoopThread:
    """A Trio loop in a daemon thread, holding one AsyncClient open."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kallichore-client",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(_JOIN_TIMEOUT):
            raise ClientError("the client's event loop did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the caller; the thread just ends
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self.client:
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._stop is None or self._stop.is_set():
            raise ClientError("the client is closed")

        async def run() -> Any:
            return await fn(*args, **kwargs)

        return trio.from_thread.run(run, trio_token=self._token)

    def close(self) -> None:
        if self._stop is not None and not self._stop.is_set() and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(_JOIN_TIMEOUT)


class Client:
    """The daemon's API, synchronous. `with Client.find() as kc: ...`, or call `close()`."""

    def __init__(self, address: discovery.ServerAddress, *, timeout_scale: float = 1.0,
                 timeouts: Timeouts | None = None, resume: bool = True) -> None:
        self.aclient = AsyncClient(address, timeout_scale=timeout_scale, timeouts=timeouts,
                                   resume=resume)
        self._loop = _LoopThread(self.aclient)
        self._sessions: dict[str, Session] = {}

    @classmethod
    def from_connection_file(cls, path: str | os.PathLike[str], **kw: Any) -> Client:
        return cls(discovery.from_connection_file(path), **kw)

    @classmethod
    def from_url(cls, url: str, token: str | None, **kw: Any) -> Client:
        return cls(discovery.find_server(url=url, token=token), **kw)

    @classmethod
    def find(cls, connection_file: str | os.PathLike[str] | None = None, **kw: Any) -> Client:
        return cls(discovery.find_server(connection_file), **kw)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and the loop (kernels keep running)."""
        self._loop.close()

    @property
    def address(self) -> discovery.ServerAddress:
        return self.aclient.address

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._loop.call(fn, *args, **kwargs)

    # server
    def status(self) -> ServerStatus:
        return self._run(self.aclient.status)

    def configuration(self) -> ServerConfiguration:
        return self._run(self.aclient.configuration)

    def set_configuration(self, configuration: ServerConfiguration) -> None:
        self._run(self.aclient.set_configuration, configuration)

    def shutdown(self) -> None:
        self._run(self.aclient.shutdown)

    # sessions
    def sessions(self) -> list[ActiveSession]:
        return self._run(self.aclient.sessions)

    def session_info(self, session_id: str) -> ActiveSession:
        return self._run(self.aclient.session_info, session_id)

    def session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(self,
                                                           self.aclient.session(session_id))
        return session

    def create_session(self, new: NewSession) -> Session:
        self._run(self.aclient.create_session, new)
        return self.session(new.session_id)

    def start(self, session_id: str, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self.aclient.start, session_id, timeout=timeout)

    def restart(self, session_id: str, **kw: Any) -> None:
        self._run(self.aclient.restart, session_id, **kw)

    def interrupt(self, session_id: str) -> None:
        self._run(self.aclient.interrupt, session_id)

    def kill(self, session_id: str) -> None:
        self._run(self.aclient.kill, session_id)

    def delete(self, session_id: str) -> None:
        self._run(self.aclient.delete, session_id)
        self._sessions.pop(session_id, None)

    def adopt(self, session_id: str, connection_info: ConnectionInfo,
              timeout: float | None = None) -> dict[str, Any]:
        return self._run(self.aclient.adopt, session_id, connection_info, timeout=timeout)

    def connection_info(self, session_id: str) -> ConnectionInfo:
        return self._run(self.aclient.connection_info, session_id)

    def history(self, session_id: str) -> list[HistoryEntry]:
        return self._run(self.aclient.history, session_id)

    def start_kernel(self, kernelspec: str | None = None, **kw: Any) -> Session:
        """See AsyncClient.start_kernel."""
        asession = self._run(self.aclient.start_kernel, kernelspec, **kw)
        return self.session(asession.id)

    def remove_session(self, session_id: str, timeout: float | None = None) -> None:
        self._run(self.aclient.remove_session, session_id, timeout=timeout)
        self._sessions.pop(session_id, None)


class SyncComm:
    def __init__(self, client: Client, comm: Comm) -> None:
        self._client = client
        self.comm = comm
        self.comm_id = comm.comm_id

    def send(self, data: dict[str, Any]) -> None:
        self._client._run(self.comm.send, data)

    def receive(self, timeout: float | None = None) -> m.Message:
        return self._client._run(self.comm.receive, timeout)

    def close(self, data: dict[str, Any] | None = None) -> None:
        self._client._run(self.comm.close, data)


class Session:
    """A kernel session, synchronous (see AsyncSession for the behaviour of each call)."""

    def __init__(self, client: Client, asession: AsyncSession) -> None:
        self.client = client
        self.asession = asession
        self.id = asession.id

    def __repr__(self) -> str:
        return f"<Session {self.id!r}>"

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.client._run(fn, *args, **kwargs)

    def execute(self, code: str, **kw: Any) -> ExecutionResult:
        return self._run(self.asession.execute, code, **kw)

    def stream(self, code: str, *, timeout: float | None = None,
               input: InputHandler | Iterable[str] | None = None,
               **kw: Any) -> Iterator[m.Message]:
        """Yield the execution's messages as they come (a generator: it sends the request
        when iteration starts)."""
        # The async stream's context must open and close in one task: run the whole iteration
        # in the loop and hand messages over through a bounded queue.
        send, recv = trio.open_memory_channel[Any](0)
        done = object()

        async def produce() -> None:
            async with send:
                try:
                    try:
                        async with self.asession.stream(code, timeout=timeout, input=input,
                                                        **kw) as messages:
                            async for msg in messages:
                                await send.send(msg)
                            await send.send((done, messages.result()))
                    except ClientError as exc:
                        await send.send((done, exc))
                except trio.BrokenResourceError:
                    pass  # the caller stopped iterating

        self._run(_spawn, self.client.aclient._nursery, produce)
        try:
            while True:
                try:
                    item = self._run(recv.receive)
                except trio.EndOfChannel:
                    return
                if isinstance(item, tuple) and item and item[0] is done:
                    if isinstance(item[1], BaseException):
                        raise item[1]
                    return
                yield item
        finally:
            self._run(_close, recv)

    def complete(self, code: str, cursor_pos: int | None = None, **kw: Any) -> dict[str, Any]:
        return self._run(self.asession.complete, code, cursor_pos, **kw)

    def inspect(self, code: str, cursor_pos: int | None = None, **kw: Any) -> dict[str, Any]:
        return self._run(self.asession.inspect, code, cursor_pos, **kw)

    def is_complete(self, code: str, **kw: Any) -> dict[str, Any]:
        return self._run(self.asession.is_complete, code, **kw)


    def kernel_info(self, **kw: Any) -> dict[str, Any]:
        return self._run(self.asession.kernel_info, **kw)

    def comm_open(self, target_name: str, data: dict[str, Any] | None = None) -> SyncComm:
        return SyncComm(self.client, self._run(self.asession.comm_open, target_name, data))

    def wait_for_event(self, predicate: Callable[[m.KernelEvent], bool], *, what: str,
                       timeout: float | None = None,
                       after: Callable[[], object] | None = None) -> m.KernelEvent:
        """`after` is a plain function here (e.g. `session.kill`); it runs in a worker thread
        once listening has begun."""
        async def run_after() -> None:
            assert after is not None
            await trio.to_thread.run_sync(after)

        return self._run(self.asession.wait_for_event, predicate, what=what, timeout=timeout,
                         after=None if after is None else run_after)

    def send(self, message: dict[str, Any]) -> None:
        self._run(self.asession.send, message)

    def attach(self, *, force: bool = False) -> None:
        self._run(self.asession.attach, force=force)

    def close(self) -> None:
        self._run(self.asession.close)

    def info(self) -> ActiveSession:
        return self._run(self.asession.info)

    def interrupt(self) -> None:
        self._run(self.asession.interrupt)

    def restart(self, **kw: Any) -> None:
        self._run(self.asession.restart, **kw)

    def kill(self) -> None:
        self._run(self.asession.kill)

    def shutdown(self, timeout: float | None = None) -> None:
        self._run(self.asession.shutdown, timeout)

    @property
    def last_result(self) -> ExecutionResult | None:
        """The last execution's result (partial if it timed out)."""
        return self.asession.last_result

    @property
    def on_notice(self) -> Callable[[m.KernelEvent], object] | None:
        """See AsyncSession.on_notice (called in the client's loop thread)."""
        return self.asession.on_notice

    @on_notice.setter
    def on_notice(self, callback: Callable[[m.KernelEvent], object] | None) -> None:
        self.asession.on_notice = callback

    @property
    def recent_events(self) -> list[m.KernelEvent]:
        return list(self.asession.recent_events)

    @property
    def exit_code(self) -> int | None:
        return self.asession.exit_code

    def kernel_output_text(self) -> str:
        return self.asession.kernel_output_text()

    def diagnostics(self) -> str:
        return self.asession.diagnostics()


async def _close(channel: trio.MemoryReceiveChannel[Any]) -> None:
    channel.close()


async def _spawn(nursery: trio.Nursery, fn: Callable[[], Any]) -> None:
    nursery.start_soon(fn)


__all__ = ["Client", "ExecutionStream", "Session", "SyncComm"]
