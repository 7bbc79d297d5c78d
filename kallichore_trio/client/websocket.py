"""A small client WebSocket over a Trio stream (TCP or Unix socket), driven by wsproto.

The daemon's channel is one text frame per message (docs/protocol.md §4); it pings every few
seconds and drops a client that stops answering (§4.4), so Pings are answered as they are read.
One task reads (`receive_text`); any task may send (a lock keeps frames whole).
"""

from __future__ import annotations

import socket
import struct
from collections import deque

import trio
import wsproto
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

_READ = 65536


class WebSocketClosed(Exception):
    """The connection ended; `code` and `reason` from the Close frame when there was one."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class HandshakeRejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body.decode('utf-8', 'replace')[:500]}")
        self.status = status
        self.body = body


class WebSocket:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._send_lock = trio.Lock()
        self._pending: deque[str] = deque()
        self._parts: list[str] = []
        self._closed: WebSocketClosed | None = None

    @classmethod
    async def connect(cls, stream: trio.abc.Stream, target: str, *, host: str,
                      token: str | None) -> WebSocket:
        """Upgrade `stream` at `target`; raises HandshakeRejected with the HTTP answer, and
        WebSocketClosed when the connection ends first."""
        try:
            return await cls._connect(stream, target, host=host, token=token)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WebSocketClosed(f"the connection broke during the upgrade: {exc}") from None

    @classmethod
    async def _connect(cls, stream: trio.abc.Stream, target: str, *, host: str,
                       token: str | None) -> WebSocket:
        self = cls(stream)
        headers = [] if token is None else [("Authorization", f"Bearer {token}")]
        await stream.send_all(self._ws.send(Request(host=host, target=target,
                                                    extra_headers=headers)))
        status, body = 0, b""
        while True:
            data = await stream.receive_some(_READ)
            if not data:
                if status:
                    raise HandshakeRejected(status, body)
                raise WebSocketClosed("the server closed the connection during the upgrade")
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, AcceptConnection):
                    continue
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise HandshakeRejected(status, b"")
                    continue
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise HandshakeRejected(status, body)
                    continue
                else:
                    # Frames that came in the same read as the 101 answer.
                    await self._handle(event)
            if self._ws.state is wsproto.connection.ConnectionState.OPEN:
                return self

    async def send_text(self, text: str) -> None:
        async with self._send_lock:
            if self._closed is not None:
                raise self._closed
            try:
                await self._stream.send_all(self._ws.send(TextMessage(data=text)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise WebSocketClosed(f"the connection broke: {exc}") from None

    async def _handle(self, event: object) -> None:
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
            if event.message_finished:
                self._pending.append("".join(self._parts))
                self._parts = []
        elif isinstance(event, Ping):
            async with self._send_lock:
                try:
                    await self._stream.send_all(self._ws.send(event.response()))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the read that follows sees the end
        elif isinstance(event, CloseConnection):
            self._closed = WebSocketClosed("the server closed the channel", event.code,
                                           event.reason or "")
            async with self._send_lock:
                try:
                    await self._stream.send_all(self._ws.send(event.response()))
                except (trio.BrokenResourceError, trio.ClosedResourceError,
                        wsproto.utilities.LocalProtocolError):
                    pass
        elif isinstance(event, BytesMessage):
            pass  # the daemon sends text frames only

    async def receive_text(self) -> str:
        """The next text frame; raises WebSocketClosed once the connection has ended."""
        while not self._pending:
            if self._closed is not None:
                raise self._closed
            try:
                data = await self._stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                data = b""
                self._closed = WebSocketClosed(f"the connection broke: {exc}")
            if not data:
                self._closed = self._closed or WebSocketClosed("the server closed the connection")
                raise self._closed
            self._ws.receive_data(data)
            for event in self._ws.events():
                await self._handle(event)
        return self._pending.popleft()

    async def abort(self) -> None:
        """Drop the connection at once, as a network failure would: no Close frame, and on TCP
        a reset (SO_LINGER 0) rather than an orderly FIN. The task reading sees the
        connection break. (For tests of what follows a lost connection.)"""
        sock = getattr(self._stream, "socket", None)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # closed already: nothing left to reset
        self._closed = self._closed or WebSocketClosed("the connection was aborted")
        await self._stream.aclose()

    async def aclose(self) -> None:
        """Send a Close (best effort, briefly) and close the stream."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            if self._closed is None and self._ws.state is wsproto.connection.ConnectionState.OPEN:
                try:
                    async with self._send_lock:
                        await self._stream.send_all(
                            self._ws.send(CloseConnection(code=1000)))
                except (trio.BrokenResourceError, trio.ClosedResourceError,
                        wsproto.utilities.LocalProtocolError):
                    pass
        await self._stream.aclose()
