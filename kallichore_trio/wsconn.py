"""Server-side WebSocket connections over any Trio stream, for the per-session Unix sockets.

The socket transport gives every session its own Unix socket (docs/protocol.md §1.3). A client connecting to
it starts with an HTTP/1.1 upgrade request on any path (Positron's
`ws+unix://<path>:/api/channels/<id>`) carrying the bearer token; the `authorize` check
(security.py) decides before anything else. A connection that does not start with `GET `, or
does not finish its request within the handshake timeout, is closed: the reference also accepts
raw WebSocket framing with no handshake, which can carry no token (docs/security.md).
wsproto's `WSConnection` does the handshake, `wsproto.connection.Connection` the framing.

`ClientConnection` is the interface the channel code uses for every client, TCP or Unix.
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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

if TYPE_CHECKING:
    from kallichore_trio.config import Config

#: Decides on an upgrade request from its headers (name, value pairs, names lowercase): None
#: to accept, or the Refusal to answer (security.check_request under a policy).
Authorize = Callable[[list[tuple[bytes, bytes]]], Refusal | None]

log = logging.getLogger(__name__)

#: sockaddr_un.sun_path is 104 bytes on macOS (108 on Linux); Kallichore uses the smaller bound.
MAX_SOCKET_PATH_BYTES = 104
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


class SocketPathTooLong(ValueError):
    """Even the shortest per-session socket name does not fit in sun_path."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"Socket path {str(path)!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes; "
            "use --socket-dir with a shorter directory"
        )
        self.path = path


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
        that stops reading fails with ClientGone (or a closed-resource error) right away."""
        ...


class WsprotoConnection:
    """A server WebSocket over a Trio stream.

    One task receives (`receive_text`); any number of tasks may send concurrently: every write
    to the stream happens under `_send_lock`, including the Pongs and Close replies that the
    receive path emits.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: Connection,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._max_message_bytes = max_message_bytes
        self._send_lock = trio.Lock()
        self._last_pong: bytes | None = None
        # Set once the peer closed or the stream broke: receive_text returns None from then on.
        self._remote_done = False
        # Set when a write was interrupted mid-frame: the framing is corrupt, nothing more may go.
        self._broken = False
        self._closed = False
        self._parts: list[str] = []
        self._parts_size = 0
        self._skipping_binary = False

    @property
    def last_pong(self) -> bytes | None:
        return self._last_pong

    @property
    def is_closed(self) -> bool:
        return self._closed or self._remote_done

    async def send_text(self, text: str) -> None:
        await self._send(TextMessage(data=text))

    async def send_texts(self, texts: Sequence[str]) -> None:
        await self._send(*[TextMessage(data=text) for text in texts])

    async def ping(self, payload: bytes) -> None:
        await self._send(Ping(payload=payload))

    async def abort(self) -> None:
        self._remote_done = True
        if not self._closed:
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
            if self._broken or self._closed:
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
                self._broken = True
                raise ClientGone(f"the WebSocket peer has gone: {exc!r}") from exc
            except BaseException:
                # Cancelled (e.g. a write timeout) part-way through a frame: the stream now holds
                # half a frame, so it can carry nothing else. Re-raise; close() will drop it.
                self._broken = True
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
        while not self._remote_done:
            for event in self._ws.events():
                text = await self._handle_event(event)
                if text is not None:
                    return text
                if self._remote_done:
                    return None
            if self._remote_done:
                break
            try:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._remote_done = True
                break
            try:
                self._ws.receive_data(data)
            except (LocalProtocolError, RemoteProtocolError):
                self._remote_done = True
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
                self._remote_done = True
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
                self._remote_done = True
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
        self._remote_done = True
        if self._closed:
            return
        try:
            if not self._broken and self._ws.state in (
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
        self._closed = True
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


def _request_headers(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The headers of an HTTP request head, None if it does not parse. Parsed apart from the
    WebSocket handshake so that authorization is decided before the handshake is validated."""
    parser = h11.Connection(h11.SERVER)
    try:
        parser.receive_data(head)
        event = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return [(bytes(name), bytes(value)) for name, value in event.headers]


async def _upgrade(stream: trio.abc.Stream, buf: bytearray, authorize: Authorize) -> Connection:
    """Answer an HTTP/1.1 WebSocket upgrade request (any path, any Host) with 101, once
    `authorize` let it in; its refusal is answered and raised as UpgradeRefused."""
    head_end = await _read_request_head(stream, buf)
    head = bytes(buf[:head_end])
    headers = _request_headers(head)
    refusal = (Refusal(400, "malformed HTTP request") if headers is None
               else authorize(headers))
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
    return ws


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
            ws = await _upgrade(stream, buf, authorize)
    except trio.TooSlowError as exc:
        raise UpgradeRefused("no HTTP upgrade request within the handshake timeout") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ClientGone(f"peer went away during the WebSocket handshake: {exc!r}") from exc
    return WsprotoConnection(stream, ws, max_message_bytes=max_message_bytes)


#: A file's identity: (st_dev, st_ino).
FileIdentity = tuple[int, int]


def file_identity(path: Path) -> FileIdentity | None:
    """(st_dev, st_ino) of whatever is at path (not following a symlink), None if nothing is."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def remove_stale_socket(path: Path) -> None:
    """Remove a socket (or any non-directory) left at path by an earlier listener."""
    try:
        if not stat.S_ISDIR(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def _remove_own_socket(path: Path, ident: FileIdentity) -> None:
    """Unlink path if it is still the file our listening socket was bound to.

    Called while that socket is still open: a bound socket keeps its file's inode allocated,
    so a file with the same identity can only be ours. Once the socket is closed the inode
    number is free, and the next socket bound at the path can get it back (ext4 does so at
    once), which would make someone else's socket look like ours.
    """
    if file_identity(path) == ident:
        try:
            path.unlink()
        except OSError as exc:
            log.warning("Could not remove socket %s: %s", path, exc)


async def serve_unix_socket(
    path: Path,
    handler: Callable[[ClientConnection], Awaitable[None]],
    *,
    authorize: Authorize,
    handshake_timeout: float,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on a Unix socket at path (mode 0600) and run handler(conn) per WebSocket client
    that `authorize` lets in (accept_websocket).

    A failure in one connection is logged and never stops the listener. Cancelling this task
    ends the open connections too (they live in its nursery) and removes the socket file, unless
    something else has replaced it in the meantime.
    """
    remove_stale_socket(path)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        # chmod before listen(): until listen() nobody can connect, so the socket is never
        # reachable with the umask's (wider) permissions.
        os.chmod(path, 0o600)
        st = path.lstat()
        ident = (st.st_dev, st.st_ino)
        sock.listen(stdlib_socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning or dying.
                    log.warning("Accept failed on %s: %s", path, exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_serve_one, stream, handler, authorize,
                                   handshake_timeout, path)
    finally:
        # The file goes first, with no checkpoint before it (see _remove_own_socket).
        _remove_own_socket(path, ident)
        await trio.aclose_forcefully(listener)


async def _serve_one(
    stream: trio.SocketStream,
    handler: Callable[[ClientConnection], Awaitable[None]],
    authorize: Authorize,
    handshake_timeout: float,
    path: Path,
) -> None:
    conn: WsprotoConnection | None = None
    try:
        conn = await accept_websocket(stream, authorize=authorize,
                                      handshake_timeout=handshake_timeout)
        await handler(conn)
    except ClientGone as exc:
        log.debug("Client on %s left: %s", path, exc)
    except Exception:
        log.exception("Error serving a WebSocket client on %s", path)
    finally:
        if conn is not None:
            await conn.close()
        else:
            await trio.aclose_forcefully(stream)


def _name_prefix(session_id: str) -> str:
    """The first 8 bytes of the id, cut back to a character boundary; no path separators."""
    raw = session_id.encode("utf-8", errors="surrogatepass")[:8]
    prefix = raw.decode("utf-8", errors="ignore")
    return prefix.replace("/", "_").replace("\0", "_")


def session_socket_path(socket_dir: Path, session_id: str, pid: int, serial: int) -> Path:
    """A per-session socket path: `kc-<pid>.<first 8 bytes of id>.<serial>.sock`.

    `serial` (one number per listener the daemon ever binds) makes the path unique: ids often
    share their first 8 bytes (`python-<hex>`), and a path shared by two sessions would lead a
    client to the wrong kernel (docs/differences.md, "Transport"). The id prefix is there for
    people reading the directory. A path over 104 bytes falls back to `kc-<pid>.<serial>.sock`;
    if that is still too long, SocketPathTooLong. Kallichore slices 8 bytes and can panic on a
    non-ASCII id; we cut at a character boundary.
    """
    path = socket_dir / f"kc-{pid}.{_name_prefix(session_id)}.{serial}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    path = socket_dir / f"kc-{pid}.{serial}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    raise SocketPathTooLong(path)


def default_socket_dir(config: Config) -> Path:
    """--socket-dir, else $XDG_RUNTIME_DIR, else the temp dir."""
    if config.socket_dir is not None:
        return config.socket_dir
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg)
    return Path(tempfile.gettempdir())


def main_socket_path(config: Config, pid: int) -> Path:
    """The generated main API socket `kc-<pid>.sock` (docs/protocol.md §1.2), when --unix-socket is absent.

    An over-long XDG runtime dir falls back to the temp dir, as Kallichore does.
    """
    if config.unix_socket is not None:
        return config.unix_socket
    path = default_socket_dir(config) / f"kc-{pid}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES and config.socket_dir is None:
        path = Path(tempfile.gettempdir()) / f"kc-{pid}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise SocketPathTooLong(path)
    return path
