"""Everything we change in Hypercorn, in one place.

Hypercorn serves the HTTP API and the upgrade of the TCP channels WebSocket. Three things it does
not do, and this module adds by replacing three of its classes (`install()`):

1. **The WebSocket is handed over once accepted.** ASGI lets an application send and receive
   messages and nothing more: no Pongs, no batched writes, no way to abort a write stuck on a
   client that stopped reading (Hypercorn shields its `send_all`). And every message crosses
   Hypercorn's layers (TCP server, HTTP/1.1 protocol, WebSocket stream, ASGI queue, Quart's
   queue), a few task hops and a few hundred microseconds of Python per round trip. So once the
   app accepts the upgrade, Hypercorn lets go of the connection: its reader stops, its stream
   goes inert, and the app gets the TCP stream and the wsproto connection as a
   `transport.websocket.WsprotoConnection`, the same code that serves the per-session Unix
   sockets.
   The app finds the handover in the ASGI scope, `scope["extensions"][EXTENSION]`, and calls
   `take_over()` after `websocket.accept()`.
   The stream also declines permessage-deflate (the reference server, tungstenite, never
   negotiates it, and on loopback compressing every frame costs CPU on both ends for nothing),
   keeps frames a client sends before the 101 arrives (Hypercorn would answer them with a 400),
   and drops bytes that follow an upgrade the app refused with an HTTP response, where Hypercorn
   would try to send a second response and fail.
2. **One connection's failure stays that connection's.** An exception escaping Hypercorn's
   per-connection task would end `serve` and with it the daemon. `GuardedTCPServer` logs it and
   closes only that connection.
3. **A kept-alive connection answers its next request** (issue 19). `KeepAliveH11Protocol`
   finishes the end of every exchange whatever the app's task does, and reads and drops a request
   body the app answered without reading, so that the connection carries on (see its comment).

Hypercorn is pinned in pyproject.toml, and tests/integration/test_keepalive.py (for the
protocol, tests/integration/test_http_keepalive.py) fails if the replacement stops taking effect
(the channel route also refuses a WebSocket whose scope lacks the handover), so an upgrade that
changes these internals fails loudly rather than silently.
"""

from __future__ import annotations

import logging
from math import inf
from typing import Any

import h11
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.events import Body, Data, EndBody
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from kallichore_trio.transport.websocket import WsprotoConnection

log = logging.getLogger(__name__)

EXTENSION = "kallichore.websocket_handover"

#: Bytes a client may send after its upgrade request and before the 101 (none is usual).
_EARLY_LIMIT = 1 << 20
_ANSWERED = frozenset({ASGIWebsocketState.RESPONSE, ASGIWebsocketState.HTTPCLOSED})
#: Request body bytes, left unread by the app, read and dropped after its answer; a client that
#: sends more than this loses the connection instead (so does one that stalls: the keep-alive
#: timeout runs while the rest is awaited).
_DRAIN_LIMIT = 64 << 20
#: Seconds the end of an exchange may take (it does not wait on the client; see _maybe_recycle).
_END_OF_EXCHANGE_TIMEOUT = 5.0


class WebSocketHandover:
    """Gives an accepted WebSocket's connection to the app, away from Hypercorn."""

    def __init__(self, stream: ControlledWSStream, server: GuardedTCPServer | None) -> None:
        self._stream = stream
        self._server = server  # None under HTTP/2, which we never negotiate (no TLS)
        self._taken = False

    def __repr__(self) -> str:
        return f"<WebSocketHandover state={self._stream.state.name} closed={self._stream.closed}>"

    async def take_over(self) -> WsprotoConnection | None:
        """After `websocket.accept()`: the connection, or None if the client already left
        (or the upgrade was not accepted, or this is not a connection we can take). Once only:
        a second call gets None, so two readers never share the stream."""
        stream, server = self._stream, self._server
        if server is None or not stream.handed_over or self._taken:
            return None
        self._taken = True
        await server.reader_stopped.wait()
        if server.reader_hit_eof:
            return None
        ws = stream.connection
        if stream.early_data:
            ws.receive_data(bytes(stream.early_data))
            stream.early_data.clear()
        return WsprotoConnection(
            server.stream, ws, max_message_bytes=stream.config.websocket_max_message_size)


class _AppWithHandover:
    """Wraps the ASGI app so the scope it sees carries the stream's WebSocketHandover."""

    def __init__(self, app: Any, handover: WebSocketHandover) -> None:
        self._app = app
        self._handover = handover

    async def __call__(self, scope: Any, *args: Any) -> None:
        scope["extensions"][EXTENSION] = self._handover
        await self._app(scope, *args)


class _AppOfServer:
    """The app as GuardedTCPServer passes it down, so a stream can find its connection."""

    def __init__(self, app: Any, server: GuardedTCPServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, *args: Any) -> None:
        await self.app(*args)


class ControlledWSStream(WSStream):
    #: Only an HTTP/1.1 connection carries one WebSocket that can be given away whole.
    _can_hand_over = True

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        server = None
        if isinstance(app, _AppOfServer):
            server = app.server if self._can_hand_over else None
            app = app.app
        self._server = server
        self.handover = WebSocketHandover(self, server)
        #: Set once the app accepted and Hypercorn let go of the connection.
        self.handed_over = False
        #: WebSocket bytes that came before the app accepted; the app's connection gets them.
        self.early_data = bytearray()
        super().__init__(_AppWithHandover(app, self.handover), *args, **kwargs)

    async def handle(self, event: Any) -> None:
        if isinstance(event, (Body, Data)):
            if self.state in _ANSWERED:
                return  # the app refused the upgrade with a response; nothing more is due
            if self._server is not None:
                # Frames before (or just as) the app accepts: the app's connection reads them
                # first. Bounded; beyond that Hypercorn's 400 stands.
                if self.handed_over or len(self.early_data) + len(event.data) <= _EARLY_LIMIT:
                    self.early_data += event.data
                    return
                self.early_data.clear()
        await super().handle(event)

    async def _accept(self, message: Any) -> None:
        self.handshake.extensions = None  # decline permessage-deflate (see the module doc)
        server = self._server
        if server is None:
            await super()._accept(message)
            return
        # Stop Hypercorn's reader before the 101 goes out: from then on the client may send
        # frames, and they must reach the app's connection, not Hypercorn.
        server.request_handover()
        await super()._accept(message)
        self.handed_over = True
        # Inert from here: Hypercorn neither reads for this stream nor writes to it (the
        # Close it sends when the app returns, for one).
        self.closed = True


class _H2WSStream(ControlledWSStream):
    # HTTP/2 multiplexes streams on the connection (h2c by prior knowledge; we offer no TLS):
    # no handover, take_over() returns None and the channel route closes.
    _can_hand_over = False


class KeepAliveH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, with the end of an exchange made whole.

    Issue 19: a request whose answer went out before its body had arrived (a 404, 405 or 401
    never reads the body) left the connection stuck; the next request on it got no answer. Two
    faults in Hypercorn 0.18 combine:

    - Hypercorn ends an exchange (`_maybe_recycle`: close the stream, then either start the
      connection's next cycle or close the connection, then re-arm the keep-alive timer) inside
      the app's `send` call, so in the app's task and under its cancel scope. Quart-Trio cancels
      that scope as soon as its receiving task sees the `http.disconnect` that this very step
      delivers, and the next checkpoint raises Cancelled: the keep-alive timer is not re-armed
      after any request, and where the body was still due the connection is neither recycled
      nor closed.
    - With the stream gone, Hypercorn's event loop stops at the first leftover body event
      (`elif self.stream is None: break`), one event per read; once the body has ended, h11
      sits in DONE/DONE with the next request buffered and nobody starts the next cycle (the
      reader waits on `can_read` for good). Hypercorn's own TCP server hangs the same way; our
      `GuardedTCPServer` reader is not involved.

    So the end of an exchange runs shielded; the app's cancellation reaches the app at its next
    checkpoint. It does not block (it puts the disconnect on the app's queue, which the app reads
    until it ends, then sends or closes); should it ever (an app that ended with its queue full),
    it gives up within a bound and closes the connection. And a body the app left unread is no
    longer a reason to close the connection (Hypercorn's intent, which would also race the
    client's next request): `_UnreadBodyDrain` takes the stream's place, drops the rest of the
    body as it arrives and starts the next cycle at its end, as servers commonly do. Hypercorn
    has already answered any `Expect: 100-continue` when it parsed the head, so the body does
    come.
    """

    async def _maybe_recycle(self) -> None:
        with trio.CancelScope(shield=True) as ending:
            ending.deadline = trio.current_time() + _END_OF_EXCHANGE_TIMEOUT
            await self._close_stream()
            # Decided only now: the rest of the body may have come in while the stream closed.
            if self._body_still_due():
                self.stream = _UnreadBodyDrain(self)  # type: ignore[assignment]
                await self.send(Updated(idle=True))  # the keep-alive timeout bounds the wait
            else:
                await super()._maybe_recycle()  # (its _close_stream finds nothing left)
        if ending.cancelled_caught:
            log.warning("an HTTP exchange could not be ended in time; closing its connection")
            with trio.CancelScope(shield=True):
                await self.send(Closed())

    def _body_still_due(self) -> bool:
        connection = self.connection
        return (
            isinstance(connection, h11.Connection)
            and connection.our_state is h11.DONE
            and connection.their_state is h11.SEND_BODY
            and not self.context.terminated.is_set()
        )


class _UnreadBodyDrain:
    """Stands in for an answered request's stream while the rest of its body arrives."""

    def __init__(self, protocol: KeepAliveH11Protocol) -> None:
        self._protocol = protocol
        self._dropped = 0

    async def handle(self, event: Any) -> None:
        if isinstance(event, Body):
            self._dropped += len(event.data)
            if self._dropped > _DRAIN_LIMIT:
                await self._protocol.send(Closed())
        elif isinstance(event, EndBody):
            await self._protocol._maybe_recycle()  # DONE/DONE now: the next cycle starts
        # StreamClosed (the connection closing meanwhile): nothing to let go of.


class GuardedTCPServer(TCPServer):
    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_AppOfServer(app, self), *args, **kwargs)
        self._handover_requested = False
        self._read_scope: trio.CancelScope | None = None
        #: Set when the reader has stopped (handover, EOF or error) and touches the stream no more.
        self.reader_stopped = trio.Event()
        self.reader_hit_eof = False

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:  # not BaseException: cancellation and KeyboardInterrupt go through
            log.exception("an HTTP connection failed inside Hypercorn; closed it, serving on")

    def request_handover(self) -> None:
        """Stop reading: the connection is the app's now. Hypercorn closes it once the app
        returns (TCPServer.run waits for the app's task, then closes the stream)."""
        self._handover_requested = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def _read_data(self) -> None:
        # Hypercorn's reader, with a way out that loses no bytes: trio's receive_some either
        # returns data or is cancelled before reading any, and bytes read as the handover
        # begins still go through the protocol to the stream, which keeps them for the app.
        try:
            while not self._handover_requested:
                data: bytes | bytearray | None = None
                with trio.CancelScope() as self._read_scope:
                    try:
                        with trio.fail_after(self.config.read_timeout or inf):
                            data = await self.stream.receive_some(MAX_RECV)
                    except (trio.ClosedResourceError, trio.BrokenResourceError,
                            trio.TooSlowError):
                        self.reader_hit_eof = True
                        break
                self._read_scope = None
                if data is None:  # cancelled by request_handover
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    self.reader_hit_eof = True
                    break
        finally:
            self._read_scope = None
            self.reader_stopped.set()
        if not self._handover_requested or self.reader_hit_eof:
            await self.protocol.handle(Closed())


def install() -> None:
    """Make Hypercorn use ControlledWSStream and GuardedTCPServer; idempotent."""
    hypercorn.protocol.H11Protocol = KeepAliveH11Protocol  # type: ignore[misc]
    hypercorn.protocol.h11.WSStream = ControlledWSStream  # type: ignore[misc]
    hypercorn.protocol.h2.WSStream = _H2WSStream  # type: ignore[misc]
    hypercorn.trio.run.TCPServer = GuardedTCPServer  # type: ignore[misc]


__all__ = [
    "EXTENSION",
    "ControlledWSStream",
    "GuardedTCPServer",
    "KeepAliveH11Protocol",
    "WebSocketHandover",
    "install",
]
