"""transport/websocket.py and unix.py (per-session Unix-socket WebSockets), and discovery.py
(the connection document and the handshake)."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing
from httpx_ws import aconnect_ws
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from kallichore_trio import discovery
from kallichore_trio.config import Config
from kallichore_trio.discovery import (
    HandshakeError,
    connection_document,
    send_handshake,
    write_connection_file,
)
from kallichore_trio.security import Policy, Refusal, check_request
from kallichore_trio.transport.unix import (
    MAX_SOCKET_PATH_BYTES,
    SocketPathTooLong,
    bind_unix,
    default_socket_dir,
    main_socket_path,
    serve_unix_socket,
    session_socket_path,
)
from kallichore_trio.transport.websocket import (
    ClientConnection,
    ClientGone,
    Lifecycle,
    UpgradeRefused,
    WsprotoConnection,
    accept_websocket,
)

Handler = Callable[[ClientConnection], Awaitable[None]]
TOKEN = "wsconn-token"
AUTH = [("Authorization", f"Bearer {TOKEN}")]
POLICY = Policy(token=TOKEN)


def authorize(headers: list[tuple[bytes, bytes]]) -> Refusal | None:
    return check_request(POLICY, headers)


async def echo(conn: ClientConnection) -> None:
    while (text := await conn.receive_text()) is not None:
        await conn.send_text(text)


@asynccontextmanager
async def serving(path: Path, handler: Handler, handshake: float = 5.0) -> AsyncIterator[Path]:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(serve_unix_socket, path, handler, authorize=authorize,
                    handshake_timeout=handshake)
        )
        yield bound
        nursery.cancel_scope.cancel()


class Client:
    """A minimal WebSocket client on wsproto: handshake (with the token) or raw framing."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection | Connection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[Event] = []

    @classmethod
    async def upgrade(cls, path: Path, target: str = "/api/channels/s1",
                      trailing: bytes = b"") -> Client:
        stream = await trio.open_unix_socket(path)
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host="localhost", target=target, extra_headers=AUTH)
        await stream.send_all(ws.send(request) + trailing)
        client = cls(stream, ws)
        event = await client.next_event()
        assert isinstance(event, AcceptConnection)
        return client

    @classmethod
    async def raw(cls, path: Path) -> Client:
        stream = await trio.open_unix_socket(path)
        return cls(stream, Connection(ConnectionType.CLIENT))

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while not self.pending:
            self.pending.extend(self.ws.events())
            if self.pending:
                break
            data = await self.stream.receive_some(1 << 20)
            self.ws.receive_data(data or None)
        return self.pending.pop(0)

    async def next_text(self) -> str:
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts)
            elif isinstance(event, Ping):
                await self.send(event.response())
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_http_upgrade_on_any_path_with_httpx_ws(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    async with serving(path, echo):
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport) as http:
            async with aconnect_ws("http://localhost/api/channels/python-1", http,
                                   headers=dict(AUTH)) as ws:
                await ws.send_text('{"hello": "world"}')
                assert await ws.receive_text() == '{"hello": "world"}'


async def test_upgrade_ignores_path_and_host(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    async with serving(path, echo):
        client = await Client.upgrade(path, target="/whatever/else?x=1")
        await client.send(TextMessage(data="ping"))
        assert await client.next_text() == "ping"
        await client.aclose()


async def test_frames_pipelined_after_the_request_are_kept(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    early = Connection(ConnectionType.CLIENT).send(TextMessage(data="early"))
    async with serving(path, echo):
        client = await Client.upgrade(path, trailing=early)
        assert await client.next_text() == "early"
        await client.aclose()


async def test_raw_framing_without_handshake_is_refused(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kallichore_trio.transport.unix")
    handled = []

    async def record(conn: ClientConnection) -> None:
        handled.append(conn)

    path = short_dir / "s.sock"
    async with serving(path, record):
        client = await Client.raw(path)
        await client.send(TextMessage(data="no handshake"))
        with trio.fail_after(5):
            assert await client.stream.receive_some(4096) == b""  # closed, nothing said
        await client.aclose()
    assert handled == []
    assert any("raw WebSocket framing is not accepted" in r.getMessage()
               for r in caplog.records if r.levelno == logging.DEBUG)


async def test_silent_client_is_dropped_after_the_handshake_timeout(short_dir: Path) -> None:
    async def greet(conn: ClientConnection) -> None:
        raise AssertionError("a client that said nothing was let in")

    path = short_dir / "s.sock"
    async with serving(path, greet, handshake=0.2):
        client = await Client.raw(path)
        with trio.fail_after(5):
            assert await client.stream.receive_some(4096) == b""
        await client.aclose()


@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        ([], 401, b""),
        ([("Authorization", "Bearer wrong")], 401, b""),
        ([("Authorization", f"Basic {TOKEN}")], 401, b""),
        ([("Authorization", f"Bearer {TOKEN}"), ("Origin", "http://evil.example")], 403,
         b"Origin not allowed"),
    ],
)
async def test_upgrade_without_the_token_or_from_a_page_is_refused(
    short_dir: Path, headers: list[tuple[str, str]], status: int, body: bytes
) -> None:
    path = short_dir / "s.sock"
    async with serving(path, echo):
        stream = await trio.open_unix_socket(path)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="localhost", target="/",
                                              extra_headers=headers)))
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
        await stream.aclose()
    assert data.startswith(f"HTTP/1.1 {status} ".encode())
    _, _, rest = data.partition(b"\r\n\r\n")
    assert rest.startswith(body) and (body or rest == b"")
    assert TOKEN.encode() not in data


async def test_a_refused_upgrade_is_refused_before_it_is_validated(short_dir: Path) -> None:
    """No token, and not a WebSocket upgrade either: 401, not 400."""
    path = short_dir / "s.sock"
    async with serving(path, echo):
        stream = await trio.open_unix_socket(path)
        await stream.send_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 401")
        await stream.aclose()


async def test_accept_websocket_raises_upgrade_refused() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    with pytest.raises(UpgradeRefused, match="missing or wrong bearer token"):
        await accept_websocket(right, authorize=authorize, handshake_timeout=5)


async def test_empty_text_frame_closes(short_dir: Path) -> None:
    results: list[str | None] = []
    done = trio.Event()

    async def record(conn: ClientConnection) -> None:
        results.append(await conn.receive_text())
        results.append(await conn.receive_text())
        done.set()

    path = short_dir / "s.sock"
    async with serving(path, record):
        client = await Client.upgrade(path)
        await client.send(TextMessage(data="first"))
        await client.send(TextMessage(data=""))
        with trio.fail_after(5):
            await done.wait()
            event = await client.next_event()
        assert results == ["first", None]
        assert isinstance(event, CloseConnection)
        await client.aclose()


async def test_client_close_frame_and_eof(short_dir: Path) -> None:
    send, receive = trio.open_memory_channel[list[str | None]](2)

    async def record(conn: ClientConnection) -> None:
        # The second call checks that it stays None after the close.
        await send.send([await conn.receive_text(), await conn.receive_text()])

    path = short_dir / "s.sock"
    async with serving(path, record):
        client = await Client.upgrade(path)
        await client.send(CloseConnection(code=1000))
        with trio.fail_after(5):
            reply = await client.next_event()
            assert await receive.receive() == [None, None]
        assert isinstance(reply, CloseConnection) and reply.code == 1000
        await client.aclose()

        client = await Client.upgrade(path)
        await client.aclose()  # plain EOF, no Close frame
        with trio.fail_after(5):
            assert await receive.receive() == [None, None]


async def test_server_close_sends_close_without_code(short_dir: Path) -> None:
    gone: list[bool] = []
    finished = trio.Event()

    async def close_now(conn: ClientConnection) -> None:
        await conn.close()
        await conn.close()  # idempotent
        try:
            await conn.send_text("too late")
        except ClientGone:
            gone.append(True)
        finished.set()

    path = short_dir / "s.sock"
    async with serving(path, close_now):
        client = await Client.upgrade(path)
        with trio.fail_after(5):
            event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1005  # empty Close payload: no status code
        await finished.wait()
        assert gone == [True]
        await client.aclose()


async def test_ping_pong_both_ways(short_dir: Path) -> None:
    pongs: list[bytes | None] = []

    async def pinger(conn: ClientConnection) -> None:
        assert conn.last_pong is None
        await conn.ping((1).to_bytes(8, "big"))
        # The Pong is processed on the receive path, before the next text message.
        assert await conn.receive_text() == "after pong"
        pongs.append(conn.last_pong)
        await conn.receive_text()

    path = short_dir / "s.sock"
    async with serving(path, pinger):
        client = await Client.upgrade(path)
        with trio.fail_after(5):
            ping = await client.next_event()
            assert isinstance(ping, Ping)
            await client.send(ping.response())
            await client.send(TextMessage(data="after pong"))
            # Our own Ping is answered automatically.
            await client.send(Ping(payload=b"abc"))
            pong = await client.next_event()
        assert isinstance(pong, Pong) and pong.payload == b"abc"
        assert pongs == [(1).to_bytes(8, "big")]
        await client.aclose()


async def test_binary_messages_are_skipped(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    async with serving(path, echo):
        client = await Client.upgrade(path)
        await client.send(BytesMessage(data=b"\x00\x01"))
        await client.send(TextMessage(data="text"))
        assert await client.next_text() == "text"
        await client.aclose()


async def test_concurrent_senders_do_not_interleave(short_dir: Path) -> None:
    async def flood(conn: ClientConnection) -> None:
        async def sender(k: int) -> None:
            for i in range(50):
                await conn.send_text(f"{k}:{i}:" + "x" * 5000)

        async with trio.open_nursery() as nursery:
            for k in range(10):
                nursery.start_soon(sender, k)
        await conn.receive_text()

    path = short_dir / "s.sock"
    async with serving(path, flood):
        client = await Client.upgrade(path)
        seen: dict[int, list[int]] = {k: [] for k in range(10)}
        with trio.fail_after(20):
            for _ in range(500):
                k, i, pad = (await client.next_text()).split(":")
                assert pad == "x" * 5000
                seen[int(k)].append(int(i))
        assert all(order == list(range(50)) for order in seen.values())
        await client.aclose()


async def test_large_messages_both_ways(short_dir: Path) -> None:
    big = "é" + "0123456789abcdef" * (2 * 1024 * 1024)  # ~32 MB, non-ASCII start
    path = short_dir / "s.sock"
    async with serving(path, echo):
        client = await Client.upgrade(path)
        with trio.fail_after(60):
            await client.send(TextMessage(data=big))
            assert await client.next_text() == big
        await client.aclose()


async def test_handler_error_does_not_stop_listener(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def flaky(conn: ClientConnection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        await echo(conn)

    path = short_dir / "s.sock"
    async with serving(path, flaky):
        first = await Client.upgrade(path)
        with trio.fail_after(5):
            assert isinstance(await first.next_event(), CloseConnection)
        await first.aclose()
        second = await Client.upgrade(path)
        await second.send(TextMessage(data="still here"))
        assert await second.next_text() == "still here"
        await second.aclose()
    assert any("boom" in (r.exc_text or "") for r in caplog.records if r.levelno >= logging.ERROR)


async def test_bad_upgrade_request_is_rejected(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    async with serving(path, echo):
        stream = await trio.open_unix_socket(path)
        await stream.send_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n"
                              b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400")
        await stream.aclose()


async def test_socket_mode_stale_file_and_cleanup(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    path.write_text("stale")
    async with serving(path, echo):
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert not path.exists()


async def test_cleanup_spares_a_replacement_socket(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    async with serving(path, echo):
        # Another listener took the path over (a new channels call for the same session).
        path.unlink()
        replacement = socket.socket(socket.AF_UNIX)
        replacement.bind(str(path))
    try:
        assert path.exists()
    finally:
        replacement.close()


def test_session_socket_path_rules(tmp_path: Path) -> None:
    d = Path("/run/user/1000")
    assert session_socket_path(d, "python-abcdef", 4242, 1) == d / "kc-4242.python-a.1.sock"
    assert session_socket_path(d, "r", 1, 2) == d / "kc-1.r.2.sock"
    # Non-ASCII: 8 bytes cut back to a character boundary, never a broken character.
    name = session_socket_path(d, "ééééé", 7, 3).name
    assert name == "kc-7.éééé.3.sock"
    assert session_socket_path(d, "日本語です", 7, 3).name == "kc-7.日本.3.sock"
    # A path separator in the id must not leave the directory.
    assert session_socket_path(d, "../../etc", 7, 3).parent == d


def test_session_socket_paths_are_unique_by_serial() -> None:
    d = Path("/run/user/1000")
    # Positron's ids share their first 8 bytes; the serial tells their sockets apart.
    a = session_socket_path(d, "python-aaaaaaaa1", 4242, 1)
    b = session_socket_path(d, "python-aaaaaaaa2", 4242, 2)
    assert a != b
    # The serial is the last dotted field and has no dot, so no id can forge another's name,
    # and the long-path fallback (one field fewer) never meets a regular name.
    assert session_socket_path(d, "x.1", 9, 2) != session_socket_path(d, "x", 9, 12)
    assert session_socket_path(d, "", 9, 3).name == "kc-9..3.sock"


def test_session_socket_path_length_limit() -> None:
    # 104 bytes exactly is allowed.
    name = "kc-123456.python-a.7.sock"
    fits = Path("/" + "d" * (MAX_SOCKET_PATH_BYTES - len(name) - 2))
    path = session_socket_path(fits, "python-abcdef", 123456, 7)
    assert path == fits / name and len(os.fsencode(path)) == MAX_SOCKET_PATH_BYTES
    # One byte more: the id prefix is dropped.
    longer = Path(str(fits) + "d")
    assert session_socket_path(longer, "python-abcdef", 123456, 7) == longer / "kc-123456.7.sock"
    # Too long even without it: the specific error, naming the path.
    too_long = Path("/" + "d" * (MAX_SOCKET_PATH_BYTES - len("kc-123456.7.sock") - 1))
    with pytest.raises(SocketPathTooLong, match="104 bytes") as info:
        session_socket_path(too_long, "python-abcdef", 123456, 7)
    assert info.value.path == too_long / "kc-123456.7.sock"


def test_default_socket_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_dir(Config(socket_dir=Path("/x"))) == Path("/x")
    assert default_socket_dir(Config()) == tmp_path
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_dir(Config()) == Path(tempfile.gettempdir())
    assert main_socket_path(Config(socket_dir=Path("/x")), 9) == Path("/x/kc-9.sock")
    assert main_socket_path(Config(unix_socket=Path("/y/s")), 9) == Path("/y/s")


@attrs.frozen
class FakeAddress:
    transport: str
    port: int | None = None
    base_path: str | None = None
    socket_path: str | None = None


TCP = FakeAddress("tcp", port=4321, base_path="http://127.0.0.1:4321")
UNIX = FakeAddress("socket", socket_path="/run/user/1000/kc-1.sock")


def test_document_tcp() -> None:
    config = Config(token="abc", log_file=Path("/tmp/k.log"))
    doc = connection_document(config, TCP, pid=99, executable="/bin/kcserver")
    assert doc == {
        "port": 4321,
        "base_path": "http://127.0.0.1:4321",
        "transport": "tcp",
        "server_path": "/bin/kcserver",
        "server_pid": 99,
        "bearer_token": "abc",
        "log_path": "/tmp/k.log",
        "server_id": config.server_id,
    }


def test_document_socket_no_token_no_log() -> None:
    config = Config(transport="socket", token=None)
    doc = connection_document(config, UNIX)
    assert doc["socket_path"] == "/run/user/1000/kc-1.sock"
    assert doc["transport"] == "socket"
    assert "port" not in doc and "base_path" not in doc and "named_pipe" not in doc
    assert doc["bearer_token"] is None
    assert "log_path" not in doc
    assert doc["server_pid"] == os.getpid()
    assert Path(doc["server_path"]).is_absolute()
    assert doc["server_id"] == config.server_id


def test_server_path_falls_back_to_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["-c"])
    assert discovery.server_path() == sys.executable


def test_write_connection_file_atomic_0600(tmp_path: Path) -> None:
    target = tmp_path / "conn.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    doc = connection_document(Config(token="secret"), TCP)
    write_connection_file(target, doc)
    assert json.loads(target.read_text()) == doc
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["conn.json"]  # no temp file left


async def test_send_handshake(short_dir: Path) -> None:
    path = short_dir / "hs.sock"
    doc = connection_document(Config(token="tok"), TCP)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)
    received = b""

    async def client_side() -> None:
        nonlocal received
        conn, _ = await listener.accept()
        with conn:
            while chunk := await conn.recv(65536):
                received += chunk

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            await send_handshake(path, doc, timeout=5)
    assert received.endswith(b"\n") and received.count(b"\n") == 1
    assert json.loads(received) == doc


async def test_send_handshake_nobody_listening(short_dir: Path) -> None:
    doc = connection_document(Config(), TCP)
    with pytest.raises(HandshakeError, match="handshake socket"):
        await send_handshake(short_dir / "missing.sock", doc, timeout=5)
    # Bound but not listening: refused.
    path = short_dir / "bound.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(HandshakeError):
            await send_handshake(path, doc, timeout=5)


async def test_send_handshake_timeout(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> None:
    async def hang(path: str) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(trio, "open_unix_socket", hang)
    with pytest.raises(HandshakeError, match="timed out"):
        await send_handshake(short_dir / "x.sock", {}, timeout=0.05)


async def test_send_to_a_vanished_peer_raises_client_gone(short_dir: Path) -> None:
    """Writes go to the socket directly when it has room; the OS error of a peer that has
    gone (EPIPE, ECONNRESET) must come out as ClientGone like trio's own errors do."""
    outcome: list[str] = []
    peer_closed = trio.Event()
    done = trio.Event()

    async def writer(conn: ClientConnection) -> None:
        await peer_closed.wait()
        try:
            for _ in range(1000):
                await conn.send_text("x" * 1000)
                await trio.sleep(0.001)
            outcome.append("never noticed")
        except ClientGone:
            outcome.append("gone")
        done.set()

    path = short_dir / "s.sock"
    async with serving(path, writer):
        client = await Client.upgrade(path)
        await client.aclose()
        peer_closed.set()
        with trio.fail_after(10):
            await done.wait()
        assert outcome == ["gone"]


async def test_send_cancelled_mid_frame_marks_connection_gone(short_dir: Path) -> None:
    outcome: list[str] = []
    done = trio.Event()

    async def slow_reader_victim(conn: ClientConnection) -> None:
        # The client never reads, so a 64 MB frame fills the socket buffers and blocks.
        with trio.move_on_after(0.2) as scope:
            await conn.send_text("x" * (64 * 1024 * 1024))
        outcome.append("cancelled" if scope.cancelled_caught else "sent")
        try:
            await conn.send_text("after")
        except ClientGone:
            outcome.append("gone")
        done.set()

    path = short_dir / "s.sock"
    async with serving(path, slow_reader_victim):
        client = await Client.upgrade(path)
        with trio.fail_after(10):
            await done.wait()
        assert outcome == ["cancelled", "gone"]
        await client.aclose()


# ---- bind_unix -----------------------------------------------------------------------------


def test_bind_unix_is_0600_whatever_the_umask_and_replaces_a_stale_file(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    path.write_text("stale")
    old_umask = os.umask(0)
    try:
        sock = bind_unix(path)
    finally:
        os.umask(old_umask)
    with sock:
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # listening
    (short_dir / "d").mkdir()
    with pytest.raises(OSError):
        bind_unix(short_dir / "d")  # a directory is never taken for a stale socket
    assert (short_dir / "d").is_dir()


# ---- the connection's lifecycle -------------------------------------------------------------


@asynccontextmanager
async def ws_pair() -> AsyncIterator[tuple[WsprotoConnection, trio.SocketStream, Connection]]:
    """A server WsprotoConnection and a wsproto client over a real socket pair, handshake done."""
    a, b = trio.socket.socketpair()
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(client.send(Request(host="localhost", target="/",
                                                     extra_headers=AUTH)))
    conn = await accept_websocket(server_stream, authorize=authorize, handshake_timeout=5)
    client.receive_data(await client_stream.receive_some(4096))
    assert any(isinstance(event, AcceptConnection) for event in client.events())
    assert client.connection is not None
    try:
        yield conn, client_stream, client.connection
    finally:
        await conn.close()
        await client_stream.aclose()


async def test_lifecycle_open_then_closed_by_the_peers_close_frame() -> None:
    async with ws_pair() as (conn, stream, client):
        assert conn.state is Lifecycle.OPEN and repr(conn) == "<WsprotoConnection open>"
        await stream.send_all(client.send(TextMessage(data="hi")))
        assert await conn.receive_text() == "hi"
        await stream.send_all(client.send(CloseConnection(code=1000)))
        with trio.fail_after(5):
            assert await conn.receive_text() is None
        # Our Close went back and the stream is shut.
        assert conn.state is Lifecycle.CLOSED and repr(conn) == "<WsprotoConnection closed>"
        with pytest.raises(ClientGone):
            await conn.send_text("late")


async def test_lifecycle_peer_done_then_broken_when_the_stream_just_ends() -> None:
    async with ws_pair() as (conn, stream, _):
        await stream.aclose()  # no Close frame: the peer's process died, say
        with trio.fail_after(5):
            assert await conn.receive_text() is None
        assert conn.state is Lifecycle.PEER_DONE
        # The first write to the dead peer fails with the OS's error (EPIPE), as ClientGone.
        with pytest.raises(ClientGone):
            await conn.send_text("anyone?")
        assert conn.state is Lifecycle.BROKEN
        await conn.close()
        assert conn.state is Lifecycle.CLOSED


async def test_lifecycle_abort_ends_both_directions_at_once() -> None:
    async with ws_pair() as (conn, _, _):
        await conn.abort()
        assert conn.state is Lifecycle.CLOSED
        assert await conn.receive_text() is None
        with pytest.raises(ClientGone):
            await conn.ping(b"12345678")
        await conn.abort()  # idempotent
        assert conn.state is Lifecycle.CLOSED
