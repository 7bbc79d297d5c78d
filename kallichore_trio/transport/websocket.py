"""The server side of a channels WebSocket, over any Trio stream.

`WsprotoConnection` serves every channels client, TCP or Unix: on TCP Hypercorn parses the
upgrade and hands the stream over (transport/hypercorn_ext.py); on a per-session Unix socket
(docs/protocol.md §1.3; the listener is transport/unix.py) `accept_websocket` does the upgrade
itself. A client there starts with an HTTP/1.1 upgrade request on any path (Positron's
`ws+unix://<path>:/api/channels/<id>`) carrying the bearer token; the `authorize` check
(security.py) decides before anything else. A connection that does not start with `GET `, or
does not finish its request within the handshake timeout, is closed: the reference also accepts
raw WebSocket framing with no handshake, which can carry no token (docs/security.md).
wsproto's `WSConnection` does the handshake, `wsproto.connection.Connection` the framing.

`ClientConnection` is the interface the channel code uses for every client. Whatever Trio or
the OS raises when the peer goes (a broken or closed stream, EPIPE, ECONNRESET) comes out of it
as one `ClientGone`, so the code above needs to know no transport's errors.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, Protocol

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from kallichore_trio.security import Refusal

#: Decides on an upgrade request from its headers (name, value pairs, names lowercase): None
#: to accept, or the Refusal to answer (security.check_request under a policy).
Authorize = Callable[[list[tuple[bytes, bytes]]], Refusal | None]
#: Looks at the request target (path and query) of an authorized upgrade: None to accept, or
#: the Refusal to answer (a bad query parameter, say).
CheckTarget = Callable[[bytes], Refusal | None]

log = logging.getLogger(__name__)

#: Bytes read per receive call; large enough that a 50 MB message is a few hundred reads.
_RECEIVE_CHUNK = 1 << 20
#: An HTTP upgrade request larger than this is not a WebSocket client we want.
_MAX_REQUEST_HEAD = 64 * 1024
#: Bound on sending our Close frame: a peer that does not read must not hold close() up.
_CLOSE_SEND_TIMEOUT = 1.0
#: Default cap on one reassembled message (Kallichore's tungstenite allows 64 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ClientGone(Exception):
    """The WebSocket peer has gone away (closed, reset, or the connection is unusable)."""


class UpgradeRefused(ClientGone):
    """The connection was not let in: no HTTP upgrade request, or `authorize` refused it."""


class Lifecycle(enum.IntEnum):
    """Where a WsprotoConnection is in its life. It only moves forward (the order below), and
    each state includes what the ones before it forbid."""

    #: Both directions work.
    OPEN = 0
    #: Nothing more will be received (the peer closed, or its stream ended or broke):
    #: receive_text returns None. We may still send until we close.
    PEER_DONE = 1
    #: A write failed, or was cut off mid-frame: the stream's framing is corrupt, nothing more
    #: may be sent (and nothing more is read).
    BROKEN = 2
    #: Our side shut the stream (close or abort).
    CLOSED = 3


# As module globals: reading an enum member off its class costs ~0.1 µs more, on every message.
_OPEN, _PEER_DONE, _BROKEN, _CLOSED = Lifecycle


class ClientConnection(Protocol):
    """One connected channels client, whatever its transport."""

    async def send_text(self, text: str) -> None:
        """Send one text message; raises ClientGone if the peer is gone."""
        ...

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Send text messages, in order, in as few socket writes as possible; ClientGone as
        send_text. The relay's fast path: a burst of output is one write, not one per frame."""
        ...

    async def receive_text(self) -> str | None:
        """The next text message; None once the peer closed (an empty text message counts)."""
        ...

    async def ping(self, payload: bytes) -> None:
        """Send a Ping frame."""
        ...

    @property
    def last_pong(self) -> bytes | None:
        """Payload of the latest Pong received."""
        ...

    async def close(self) -> None:
        """Send a Close frame (no code) and shut the stream; idempotent."""
        ...

    async def abort(self) -> None:
        """Shut the transport at once, without a closing handshake. A send blocked on a peer
        that stops reading fails with ClientGone right away."""
        ...


class WsprotoConnection:
    """A server WebSocket over a Trio stream.

    One task receives (`receive_text`); any number of tasks may send concurrently: every write
    to the stream happens under `_send_lock`, including the Pongs and Close replies that the
    receive path emits. Its state is one `Lifecycle`, shown in its repr.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: Connection,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        target: bytes = b"",
    ) -> None:
        #: The request target (path and query) of the upgrade, where we answered it.
        self.target = target
        self._stream = stream
        self._ws = ws
        self._max_message_bytes = max_message_bytes
        self._send_lock = trio.Lock()
        self._last_pong: bytes | None = None
        self._state = _OPEN
        self._parts: list[str] = []
        self._parts_size = 0

    def __repr__(self) -> str:
        return f"<WsprotoConnection {self._state.name.lower()}>"

    @property
    def state(self) -> Lifecycle:
        return self._state

    def _advance(self, state: Lifecycle) -> None:
        """Move on to `state`, unless the connection is past it already."""
        if state > self._state:
            self._state = state

    @property
    def last_pong(self) -> bytes | None:
        return self._last_pong

    async def send_text(self, text: str) -> None:
        await self._send(TextMessage(data=text))

    async def send_texts(self, texts: Sequence[str]) -> None:
        await self._send(*[TextMessage(data=text) for text in texts])

    async def ping(self, payload: bytes) -> None:
        await self._send(Ping(payload=payload))

    async def abort(self) -> None:
        if self._state is not _CLOSED:
            await self._shut_stream()

    async def _send(self, *events: TextMessage | Ping | Pong | CloseConnection) -> None:
        """Write `events` as one socket write. A checkpoint only when it has to wait (for the
        lock or for room in the socket buffer): the relay's writer sends a batch per wake-up,
        and trio's lock and send_all would each add a yield, a task step per write."""
        lock = self._send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._state >= _BROKEN:
                raise ClientGone("the WebSocket connection is closed")
            try:
                data = b"".join([self._ws.send(event) for event in events])
            except LocalProtocolError as exc:
                # wsproto refuses data once a Close has been sent or received.
                raise ClientGone(f"the WebSocket connection is closing: {exc}") from exc
            try:
                sent = self._write_now(data)
                if sent < len(data):
                    await self._stream.send_all(memoryview(data)[sent:])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._advance(_BROKEN)
                raise ClientGone(f"the WebSocket peer has gone: {exc!r}") from exc
            except BaseException:
                # Cancelled (e.g. a write timeout) part-way through a frame: the stream now holds
                # half a frame, so it can carry nothing else. Re-raise; close() will drop it.
                self._advance(_BROKEN)
                raise
        finally:
            lock.release()

    def _write_now(self, data: bytes) -> int:
        """As much of `data` as the socket takes without blocking (0 for a stream that is not
        a socket). Trio keeps its sockets non-blocking, and Python ignores SIGPIPE, so a gone
        peer is an OSError here, not a signal."""
        sock = getattr(self._stream, "socket", None)
        if sock is None:
            return 0
        try:
            return os.write(sock.fileno(), data)
        except BlockingIOError:
            return 0

    async def receive_text(self) -> str | None:
        while self._state is _OPEN:
            for event in self._ws.events():
                text = await self._handle_event(event)
                if text is not None:
                    return text
                if self._state is not _OPEN:
                    return None
            if self._state is not _OPEN:
                break
            try:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._advance(_PEER_DONE)
                break
            try:
                self._ws.receive_data(data)
            except (LocalProtocolError, RemoteProtocolError):
                self._advance(_PEER_DONE)
        return None

    async def _handle_event(self, event: Any) -> str | None:
        """Apply one wsproto event; returns a completed text message, if this event ended one."""
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
            self._parts_size += len(event.data)
            if self._parts_size > self._max_message_bytes:
                log.warning("WebSocket message over %d bytes; closing", self._max_message_bytes)
                await self._close_with(CloseReason.MESSAGE_TOO_BIG)
                return None
            if not event.message_finished:
                return None
            text = "".join(self._parts)
            self._parts.clear()
            self._parts_size = 0
            if not text:
                # Kallichore treats an empty text message as the client closing.
                self._advance(_PEER_DONE)
                await self.close()
                return None
            return text
        if isinstance(event, BytesMessage):
            # Binary messages carry nothing in this protocol; Kallichore ignores them.
            return None
        if isinstance(event, Ping):
            try:
                await self._send(event.response())
            except ClientGone:
                self._advance(_PEER_DONE)
            return None
        if isinstance(event, Pong):
            self._last_pong = bytes(event.payload)
            return None
        if isinstance(event, CloseConnection):
            # The peer's Close (state REMOTE_CLOSING): echo its code to complete the closing
            # handshake (RFC 6455 §5.5.1). A framing error (state still OPEN): close with the
            # protocol error code wsproto chose. Either way the stream is then dropped.
            await self._close_with(event.code)
            return None
        return None

    async def _close_with(self, code: int) -> None:
        if self._state is _CLOSED:
            return
        self._advance(_PEER_DONE)
        try:
            if self._state is not _BROKEN and self._ws.state in (
                ConnectionState.OPEN,
                ConnectionState.REMOTE_CLOSING,
            ):
                with trio.move_on_after(_CLOSE_SEND_TIMEOUT):
                    try:
                        await self._send(CloseConnection(code=code))
                    except ClientGone:
                        pass
        finally:
            # Even when cancelled: the stream (and its fd) must not outlive the connection.
            await self._shut_stream()

    async def close(self) -> None:
        # NO_STATUS_RCVD makes wsproto send a Close frame with an empty payload (no code),
        # which is what Kallichore sends.
        await self._close_with(CloseReason.NO_STATUS_RCVD)

    async def _shut_stream(self) -> None:
        self._state = _CLOSED
        # aclose never blocks for long and wakes a receiver blocked on the stream.
        await trio.aclose_forcefully(self._stream)


async def _read_at_least(stream: trio.abc.Stream, buf: bytearray, n: int) -> bool:
    """Read into buf until it holds n bytes; False at EOF."""
    while len(buf) < n:
        data = await stream.receive_some(_RECEIVE_CHUNK)
        if not data:
            return False
        buf += data
    return True


async def _read_request_head(stream: trio.abc.Stream, buf: bytearray) -> int:
    """Read until the blank line ending the HTTP request head; returns its end offset."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return end + 4
        if len(buf) > _MAX_REQUEST_HEAD:
            raise ClientGone("HTTP upgrade request head is too large")
        data = await stream.receive_some(_RECEIVE_CHUNK)
        if not data:
            raise ClientGone("peer closed during the HTTP upgrade request")
        buf += data


def _request_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """The target and headers of an HTTP request head, None if it does not parse. Parsed apart
    from the WebSocket handshake so that authorization is decided before the handshake is
    validated."""
    parser = h11.Connection(h11.SERVER)
    try:
        parser.receive_data(head)
        event = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return bytes(event.target), [(bytes(name), bytes(value)) for name, value in event.headers]


async def _upgrade(stream: trio.abc.Stream, buf: bytearray, authorize: Authorize,
                   check_target: CheckTarget | None) -> tuple[Connection, bytes]:
    """Answer an HTTP/1.1 WebSocket upgrade request (any path, any Host) with 101, once
    `authorize`, then `check_target`, let it in; a refusal is answered and raised as
    UpgradeRefused. Returns the connection and the request target."""
    head_end = await _read_request_head(stream, buf)
    head = bytes(buf[:head_end])
    request = _request_head(head)
    if request is None:
        refusal: Refusal | None = Refusal(400, "malformed HTTP request")
        target = b""
    else:
        target, headers = request
        refusal = authorize(headers)
        if refusal is None and check_target is not None:
            refusal = check_target(target)
    if refusal is not None:
        try:
            await stream.send_all(refusal_response(refusal.status, refusal.reason))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # Never the headers: they may hold a token (a wrong one may be a real one).
        log.warning("refused a WebSocket upgrade on a session socket: %s", refusal.reason)
        raise UpgradeRefused(refusal.reason)
    handshake = WSConnection(ConnectionType.SERVER)
    try:
        # Only the request head goes to h11: bytes after it are already WebSocket frames, and
        # wsproto would otherwise keep them in h11's buffer and lose them.
        handshake.receive_data(head)
        events = list(handshake.events())
    except RemoteProtocolError as exc:
        await _reject(stream, handshake, exc)
        raise ClientGone(f"bad WebSocket upgrade request: {exc}") from exc
    if not any(isinstance(event, Request) for event in events):
        raise ClientGone("no WebSocket upgrade request received")
    await stream.send_all(handshake.send(AcceptConnection()))
    ws = handshake.connection
    assert ws is not None  # set by sending AcceptConnection
    rest = bytes(buf[head_end:])
    if rest:
        ws.receive_data(rest)
    return ws, target


def refusal_response(status: int, reason: str) -> bytes:
    """The HTTP response refusing an upgrade: an empty body for 401 (as the API answers), else
    the reason as text. Written out whole: it does not depend on the request being a valid
    WebSocket upgrade, which is only looked at once the request is let in."""
    body = b"" if status == 401 else reason.encode("utf-8")
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
             f"content-length: {len(body)}", "connection: close"]
    if body:
        lines.append("content-type: text/plain; charset=utf-8")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


async def _reject(
    stream: trio.abc.Stream, handshake: WSConnection, exc: RemoteProtocolError
) -> None:
    hint = exc.event_hint
    if not isinstance(hint, RejectConnection):
        hint = RejectConnection(status_code=400)
    try:
        await stream.send_all(handshake.send(hint))
    except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
        pass


async def accept_websocket(
    stream: trio.abc.Stream,
    *,
    authorize: Authorize,
    check_target: CheckTarget | None = None,
    handshake_timeout: float = 10.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> WsprotoConnection:
    """Turn a freshly accepted stream into a server WebSocket (docs/protocol.md §1.3).

    The client must send an HTTP upgrade request within `handshake_timeout`, and `authorize`
    must let it in (its refusal is answered with the status it names). Anything else, raw
    WebSocket framing included, is refused: UpgradeRefused, or ClientGone if the peer left.
    """
    buf = bytearray()
    try:
        with trio.fail_after(handshake_timeout):
            if not await _read_at_least(stream, buf, 4):
                raise ClientGone("peer closed before sending anything")
            if buf[:4] != b"GET ":
                raise UpgradeRefused("the connection did not start with an HTTP upgrade "
                                     "request (raw WebSocket framing is not accepted)")
            ws, target = await _upgrade(stream, buf, authorize, check_target)
    except trio.TooSlowError as exc:
        raise UpgradeRefused("no HTTP upgrade request within the handshake timeout") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ClientGone(f"peer went away during the WebSocket handshake: {exc!r}") from exc
    return WsprotoConnection(stream, ws, max_message_bytes=max_message_bytes, target=target)
