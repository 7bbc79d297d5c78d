"""A small asyncio WebSocket client (RFC 6455), light enough not to be the bottleneck.

Frames are parsed straight from the transport's buffer in ``data_received`` and handed to a
synchronous callback, with no queue and no task switch per message. Pings are answered at once
(kallichore-trio drops clients that miss pongs), TCP_NODELAY is set, no compression.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

OnMessage = Callable[[bytes, bool], None]  # (payload, is_text)


class HandshakeError(Exception):
    pass


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    repeated = (key * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, unfragmented client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WebSocket(asyncio.Protocol):
    def __init__(self, on_message: OnMessage, request: bytes, accept: bytes) -> None:
        self.on_message = on_message
        self._request = request
        self._accept = accept
        self._buf = bytearray()
        self._handshaken = False
        self._frag_op = 0
        self._frag: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[str] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.subprotocol = ""

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._handshaken and not self._read_handshake():
            return
        self._read_frames()

    # -- parsing ----------------------------------------------------------------------------
    def _read_handshake(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = head[0].split(" ", 2)
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if len(status) < 2 or status[1] != "101":
            self.opened.set_exception(HandshakeError(f"upgrade refused: {head[0]}"))
            self.close_transport()
            return False
        if fields.get("sec-websocket-accept", "").encode() != self._accept:
            self.opened.set_exception(HandshakeError("bad Sec-WebSocket-Accept"))
            self.close_transport()
            return False
        self.subprotocol = fields.get("sec-websocket-protocol", "")
        self._handshaken = True
        self.opened.set_result(self.subprotocol)
        return True

    def _read_frames(self) -> None:
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            hlen = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hlen = 4
            elif n == 127:
                if end - pos < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 2)
                hlen = 10
            if b1 & 0x80:  # servers must not mask; tolerate it anyway
                hlen += 4
            if end - pos < hlen + n:
                break
            payload = bytes(buf[pos + hlen : pos + hlen + n])
            if b1 & 0x80:
                payload = _mask(payload, bytes(buf[pos + hlen - 4 : pos + hlen]))
            pos += hlen + n
            self._frame(b0 & 0x80 != 0, b0 & 0x0F, payload)
        del buf[:pos]

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BIN):
            if fin:
                self.on_message(payload, opcode == OP_TEXT)
            else:
                self._frag_op, self._frag = opcode, [payload]
        elif opcode == OP_CONT:
            self._frag.append(payload)
            if fin:
                self.on_message(b"".join(self._frag), self._frag_op == OP_TEXT)
                self._frag = []
        elif opcode == OP_PING:
            self._write(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            self._write(OP_CLOSE, payload[:2])
            self.close_transport()

    # -- sending ----------------------------------------------------------------------------
    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload))

    def send_text(self, text: str) -> None:
        self._write(OP_TEXT, text.encode())

    def send_bytes(self, data: bytes) -> None:
        self._write(OP_BIN, data)

    def close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def close(self, timeout: float = 2.0) -> None:
        """Send a Close frame, wait briefly for the server's, then drop the connection."""
        self._write(OP_CLOSE, struct.pack("!H", 1000))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            pass
        finally:
            self.close_transport()


async def connect(
    host: str,
    port: int,
    path: str,
    on_message: OnMessage,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    timeout: float = 30.0,
) -> WebSocket:
    """Open a WebSocket to ws://host:port/path; on_message(payload, is_text) gets every message."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    _, ws = await asyncio.wait_for(
        loop.create_connection(lambda: WebSocket(on_message, request, accept), host, port),
        timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(ws.opened), timeout)
    except BaseException:
        ws.close_transport()
        raise
    return ws
