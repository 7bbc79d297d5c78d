"""A minimal client WebSocket over any Trio stream, driven by wsproto.

Unlike httpx-ws it shows the test every frame, Pings included, and answers Pings only when told
to: what the keep-alive tests need to play a client that stops answering.
"""

from __future__ import annotations

from typing import Any

import trio
import wsproto
from wsproto.events import AcceptConnection, Ping, Request, TextMessage


def auth_headers(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("Authorization", f"Bearer {token}")]


class RawWebSocket:
    def __init__(self, stream: trio.abc.Stream, *, answer_pings: bool = True) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.answer_pings = answer_pings
        self.accepted: AcceptConnection | None = None
        self.pings: list[bytes] = []
        self.pending: list[str] = []
        self._parts: list[str] = []

    @classmethod
    async def connect(cls, stream: trio.abc.Stream, target: str, *, token: str | None,
                      extensions: list[Any] | None = None,
                      answer_pings: bool = True) -> RawWebSocket:
        """Upgrade with `Authorization: Bearer <token>` (none when token is None)."""
        self = cls(stream, answer_pings=answer_pings)
        request = Request(host="localhost", target=target, extensions=extensions or [],
                          extra_headers=auth_headers(token))
        await stream.send_all(self.ws.send(request))
        while self.accepted is None:
            data = await stream.receive_some(65536)
            assert data, "server closed the connection during the handshake"
            self.ws.receive_data(data)
            for event in self.ws.events():
                if self.accepted is not None:
                    # The server's first frames may share a read with its handshake answer.
                    await self._handle(event)
                    continue
                if not isinstance(event, AcceptConnection):
                    raise AssertionError(f"handshake failed: {event!r}")
                self.accepted = event
        return self

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def _pump(self) -> bool:
        """Read once and process what arrived; False at EOF."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            return False
        self.ws.receive_data(data)
        for event in self.ws.events():
            await self._handle(event)
        return True

    async def _handle(self, event: Any) -> None:
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
            if event.message_finished:
                self.pending.append("".join(self._parts))
                self._parts = []
        elif isinstance(event, Ping):
            self.pings.append(bytes(event.payload))
            if self.answer_pings:
                await self.stream.send_all(self.ws.send(event.response()))

    async def receive_text(self) -> str:
        while not self.pending:
            assert await self._pump(), "server closed the connection"
        return self.pending.pop(0)

    async def read_until_closed(self) -> None:
        """Keep reading (and answering Pings, if told to) until the server closes."""
        while await self._pump():
            pass
