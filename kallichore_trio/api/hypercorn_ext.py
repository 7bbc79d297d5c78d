"""Everything we change in Hypercorn, in one place.

Hypercorn serves the HTTP API and the TCP channels WebSocket. Three things it does not do, and
this module adds by replacing two of its classes (`install()`):

1. **The WebSocket beyond ASGI.** ASGI lets an application send and receive messages, nothing
   more. `ControlledWSStream` puts a `WebSocketControl` into the connection's ASGI scope under
   `scope["extensions"][EXTENSION]`, which `api.channels` uses for:
   * receiving: client messages go from Hypercorn's reader to the control's bounded inbox,
     skipping the ASGI queue and Quart's (two task hops on every request's way in);
   * keep-alive accounting: a Ping with a payload and the payload of the latest Pong, so a
     client that stops answering is noticed (ASGI never shows Pongs to the app);
   * batched writes: many messages encoded and handed to the socket in one write, instead of
     one ASGI event, one wsproto call and one `send_all` per message (the relay's biggest cost);
   * abort: the TCP connection closed under a write that is stuck. Hypercorn shields its
     `send_all`, so a client that stops reading would hold the writer forever.
   The stream also declines permessage-deflate: the reference server (tungstenite) never
   negotiates it, and on a loopback channel compressing every frame costs CPU on both ends for
   nothing. And it drops bytes that follow an upgrade the app refused with an HTTP response,
   where Hypercorn would try to send a second response and fail.
2. **One connection's failure stays that connection's.** An exception escaping Hypercorn's
   per-connection task would end `serve` and with it the daemon. `GuardedTCPServer` logs it and
   closes only that connection.

Hypercorn is pinned in pyproject.toml, and tests/test_keepalive.py fails if the replacement
stops taking effect (the channel route also refuses a WebSocket whose scope lacks the control),
so an upgrade that changes these internals fails loudly rather than silently.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable
from typing import Any

import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.protocol.events import Body, Data, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.events import Event, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

log = logging.getLogger(__name__)

EXTENSION = "kallichore.websocket_control"


class WebSocketControl:
    """Pings, Pongs, batched writes and abort for one Hypercorn WebSocket."""

    def __init__(self, stream: ControlledWSStream) -> None:
        self._stream = stream
        #: Payload of the latest Pong received, or None before the first.
        self.last_pong: bytes | None = None
        # Messages from the client come here straight from Hypercorn's reader, not through
        # the ASGI receive queue and Quart's own queue: two task hops fewer per request.
        # Bounded: a full inbox holds Hypercorn's reader, and so the client, back.
        self._inbox_send, self._inbox = trio.open_memory_channel[Any](_INBOX_SIZE)

    def __repr__(self) -> str:
        return f"<WebSocketControl state={self._stream.state.name} closed={self._stream.closed}>"

    @property
    def usable(self) -> bool:
        return not self._stream.closed and self._stream.state == ASGIWebsocketState.CONNECTED

    async def receive_text(self) -> str | None:
        """The next text message from the client; None once it is gone. Binary messages
        are skipped (this protocol carries none)."""
        while True:
            try:
                message = await self._inbox.receive()
            except trio.EndOfChannel:
                return None
            text = message.get("text")
            if text is not None:
                return text

    async def send_texts(self, texts: Iterable[str]) -> bool:
        """Send text messages in one socket write; False if the connection is gone."""
        stream = self._stream
        if not self.usable:
            return False
        encode = stream.connection.send
        try:
            data = b"".join([encode(TextMessage(data=text)) for text in texts])
        except LocalProtocolError:  # a Close was sent or received: no more data frames
            return False
        await stream.send(Data(stream_id=stream.stream_id, data=data))
        return not stream.closed

    async def ping(self, payload: bytes) -> bool:
        """Send a Ping; False if the connection is gone."""
        stream = self._stream
        if not self.usable:
            return False
        try:
            data = stream.connection.send(Ping(payload=payload))
        except LocalProtocolError:
            return False
        await stream.send(Data(stream_id=stream.stream_id, data=data))
        return not stream.closed

    async def abort(self) -> None:
        """Close the TCP connection now, waking a write blocked on it."""
        stream = self._stream
        if not stream.closed:
            # StreamClosed makes the HTTP/1.1 protocol close the transport (an upgraded
            # connection is never recycled); that wakes a blocked send_all with an error.
            # Shielded: telling the app about the disconnect cancels the app's tasks, this
            # one included, and a cancel half-way would leave the socket open.
            with trio.CancelScope(shield=True):
                await stream.send(StreamClosed(stream_id=stream.stream_id))


class _AppWithControl:
    """Wraps the ASGI app so the scope it sees carries the stream's WebSocketControl."""

    def __init__(self, app: Any, control: WebSocketControl) -> None:
        self._app = app
        self._control = control

    async def __call__(self, scope: Any, *args: Any) -> None:
        scope["extensions"][EXTENSION] = self._control
        await self._app(scope, *args)


_ANSWERED = frozenset({ASGIWebsocketState.RESPONSE, ASGIWebsocketState.HTTPCLOSED})
_INBOX_SIZE = 64


class ControlledWSStream(WSStream):
    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        self.control = WebSocketControl(self)
        super().__init__(_AppWithControl(app, self.control), *args, **kwargs)

    async def handle(self, event: Any) -> None:
        if isinstance(event, (Body, Data)) and self.state in _ANSWERED:
            return  # the app refused the upgrade with a response; nothing more is due
        await super().handle(event)

    async def _accept(self, message: Any) -> None:
        self.handshake.extensions = None  # decline permessage-deflate (see the module doc)
        await super()._accept(message)
        events = self.connection.events

        def events_noting_pongs() -> Generator[Event]:
            for event in events():
                if isinstance(event, Pong):
                    self.control.last_pong = bytes(event.payload)
                yield event

        # Hypercorn's event loop ignores Pongs; tap them on the way past.
        self.connection.events = events_noting_pongs  # type: ignore[method-assign]
        self._put_to_app = self.app_put
        self.app_put = self._put

    async def _put(self, message: Any) -> None:
        """Route client messages to the control's inbox; everything else to the app."""
        if message["type"] == "websocket.receive":
            try:
                await self.control._inbox_send.send(message)
            except trio.ClosedResourceError:
                pass
            return
        if message["type"] == "websocket.disconnect":
            self.control._inbox_send.close()
        assert self._put_to_app is not None
        await self._put_to_app(message)


class GuardedTCPServer(TCPServer):
    async def run(self) -> None:
        try:
            await super().run()
        except Exception:  # not BaseException: cancellation and KeyboardInterrupt go through
            log.exception("an HTTP connection failed inside Hypercorn; closed it, serving on")


def install() -> None:
    """Make Hypercorn use ControlledWSStream and GuardedTCPServer; idempotent."""
    hypercorn.protocol.h11.WSStream = ControlledWSStream  # type: ignore[misc]
    hypercorn.protocol.h2.WSStream = ControlledWSStream  # type: ignore[misc]
    hypercorn.trio.run.TCPServer = GuardedTCPServer  # type: ignore[misc]


__all__ = ["EXTENSION", "ControlledWSStream", "GuardedTCPServer", "WebSocketControl", "install"]
