"""Who may talk to the real daemon: the token on every route and upgrade, Origin, Host.

Requests go out as raw HTTP/1.1 (h11) where the test must choose every header (Host, Origin,
a WebSocket upgrade); httpx elsewhere.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import attrs
import h11
import httpx
import psutil
import pytest
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from kallichore_trio.api import create_app
from kallichore_trio.app import run_daemon
from kallichore_trio.config import Config
from kallichore_trio.daemon import Daemon
from tests.helpers import (
    TOKEN,
    RawWebSocket,
    RunningDaemon,
    daemon_config,
    execute_request,
    is_idle_for,
    launch,
    mini_argv,
    new_session_body,
    running_daemon,
    stop,
)

WRONG = "wrong-token-0123456789"
NO_SUCH = "no-such-session"
EVIL = "http://evil.example"


@attrs.frozen
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def _upgrade_headers() -> list[tuple[str, str]]:
    key = base64.b64encode(os.urandom(16)).decode()
    return [("Connection", "Upgrade"), ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key)]


async def exchange(stream: trio.abc.Stream, method: str, target: str,
                   headers: list[tuple[str, str]], *, upgrade: bool = False,
                   body: bytes = b"") -> Answer:
    """One request on its own connection, with exactly these headers (Host first)."""
    client = h11.Connection(h11.CLIENT)
    if upgrade:
        headers = headers + _upgrade_headers()
    if body:
        headers = [*headers, ("Content-Length", str(len(body)))]
    data = client.send(h11.Request(method=method, target=target, headers=headers))
    if body:
        data += client.send(h11.Data(data=body))
    data += client.send(h11.EndOfMessage())
    async with stream:
        await stream.send_all(data)
        status, answer_headers, content = 0, {}, b""
        with trio.fail_after(30):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                    return Answer(101, dict(event.headers), b"")
                if isinstance(event, h11.Response):
                    status, answer_headers = event.status_code, dict(event.headers)
                elif isinstance(event, h11.Data):
                    content += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return Answer(status, answer_headers, content)


def auth(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("Authorization", f"Bearer {token}")]


async def tcp(daemon: RunningDaemon, method: str, target: str, *, token: str | None = TOKEN,
              host: str | None = None, origin: str | None = None,
              upgrade: bool = False) -> Answer:
    port = daemon.address.port
    headers = [("Host", host if host is not None else f"127.0.0.1:{port}"), *auth(token)]
    if origin is not None:
        headers.append(("Origin", origin))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return await exchange(stream, method, target, headers, upgrade=upgrade)


def routes() -> list[tuple[str, str, bool]]:
    """(method, path pattern, is a WebSocket) for every route the app has, so that a route
    added later is in the matrix without anyone adding it here."""
    daemon = Daemon(Config(), None, mcp=None)  # type: ignore[arg-type]  # routes only, never called
    found = []
    for rule in create_app(daemon).url_map.iter_rules():
        for method in sorted(rule.methods or ()):
            found.append((method, rule.rule, bool(rule.websocket)))
    return found


def fill(pattern: str, session_id: str) -> str:
    return pattern.replace("<session_id>", session_id)


def expect_401(answer: Answer, what: str) -> None:
    assert answer.status == 401, f"{what}: {answer}"
    assert answer.body == b"", what


async def session_ids(client: httpx.AsyncClient) -> set[str]:
    return {s["session_id"] for s in (await client.get("/sessions")).json()["sessions"]}


async def test_the_matrix_covers_every_route() -> None:
    found = {(m, p) for m, p, _ in routes()}
    # A sample, so that a broken route listing cannot make the matrix empty.
    assert {("PUT", "/sessions"), ("GET", "/sessions"), ("POST", "/shutdown"),
            ("GET", "/sessions/<session_id>/channels"), ("POST", "/client_heartbeat"),
            ("POST", "/server_configuration")} <= found
    assert any(ws for _, _, ws in routes())
    assert not any(p.startswith("/static") for _, p, _ in routes())


async def test_every_tcp_route_needs_the_token(daemon: RunningDaemon) -> None:
    known = await daemon.create(mini_argv("normal"))
    body = json.dumps(new_session_body("made-without-a-token")).encode()
    checked = 0
    for method, pattern, websocket in [*routes(), ("GET", "/no/such/path", False),
                                       ("POST", "/no/such/path", False)]:
        if pattern == "/status" and method in ("GET", "HEAD"):
            continue
        for session_id in (known, NO_SUCH):
            for token in (None, WRONG):
                what = f"{method} {pattern} ({session_id}, token {token})"
                answer = await tcp(daemon, method, fill(pattern, session_id), token=token,
                                   upgrade=websocket)
                expect_401(answer, what)
                checked += 1
        if method == "PUT" and pattern == "/sessions":
            port = daemon.address.port
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            answer = await exchange(stream, "PUT", "/sessions",
                                    [("Host", f"127.0.0.1:{port}"),
                                     ("Content-Type", "application/json")], body=body)
            expect_401(answer, "PUT /sessions with a body")
    assert checked > 60
    # Nothing was done on the refused requests' behalf.
    assert await session_ids(daemon.client) == {known}
    assert (await daemon.client.get(f"/sessions/{known}")).json()["status"] == "idle"

    # With the token, each route answers as a route does (never 401 or 403).
    for method, pattern, websocket in routes():
        if pattern == "/shutdown":
            continue
        answer = await tcp(daemon, method, fill(pattern, NO_SUCH), upgrade=websocket)
        assert answer.status not in (401, 403), f"{method} {pattern}: {answer}"
    assert (await tcp(daemon, "GET", "/no/such/path")).status == 404
    # An unknown session: 401 without the token, 404 (400 on the upgrade) with it.
    assert (await tcp(daemon, "GET", f"/sessions/{NO_SUCH}")).status == 404
    assert (await tcp(daemon, "GET", f"/sessions/{NO_SUCH}/channels", upgrade=True)).status \
        == 400
    assert (await tcp(daemon, "GET", f"/sessions/{known}/channels", upgrade=True)).status == 101
    assert (await tcp(daemon, "POST", "/shutdown")).status == 200


async def test_status_needs_no_token_and_says_no_more(daemon: RunningDaemon) -> None:
    for token in (None, WRONG, TOKEN):
        answer = await tcp(daemon, "GET", "/status", token=token)
        assert answer.status == 200
        assert json.loads(answer.body)["server_id"] == daemon.config.server_id
    assert (await tcp(daemon, "HEAD", "/status", token=None)).status == 200
    expect_401(await tcp(daemon, "POST", "/status", token=None), "POST /status")


@attrs.frozen
class SocketDaemon:
    socket_path: str
    client: httpx.AsyncClient


@pytest.fixture
async def socket_daemon(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[SocketDaemon]:
    config = daemon_config(short_dir, transport="socket")
    address = await nursery.start(partial(run_daemon, config))
    transport = httpx.AsyncHTTPTransport(uds=address.socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                 headers=dict(auth(TOKEN)), timeout=30) as client:
        yield SocketDaemon(address.socket_path, client)
        try:
            await client.post("/shutdown")
        except httpx.HTTPError:
            pass


async def unix(path: str, method: str, target: str, *, token: str | None = TOKEN,
               host: str = "localhost", origin: str | None = None,
               upgrade: bool = False) -> Answer:
    headers = [("Host", host), *auth(token)]
    if origin is not None:
        headers.append(("Origin", origin))
    return await exchange(await trio.open_unix_socket(path), method, target, headers,
                          upgrade=upgrade)


async def test_every_route_needs_the_token_on_the_socket_transport(
    socket_daemon: SocketDaemon,
) -> None:
    client, path = socket_daemon.client, socket_daemon.socket_path
    body = new_session_body("sock-known", mini_argv("normal"))
    assert (await client.put("/sessions", json=body)).status_code == 200
    for method, pattern, websocket in [*routes(), ("GET", "/no/such/path", False)]:
        if pattern == "/status" and method in ("GET", "HEAD"):
            continue
        for session_id in ("sock-known", NO_SUCH):
            for token in (None, WRONG):
                answer = await unix(path, method, fill(pattern, session_id), token=token,
                                    upgrade=websocket)
                expect_401(answer, f"{method} {pattern} ({session_id}, token {token})")
    assert await session_ids(client) == {"sock-known"}
    # No Host check on a Unix socket: clients send the socket path, or anything.
    assert (await unix(path, "GET", "/status", token=None, host=path)).status == 200
    assert (await unix(path, "GET", "/sessions", host="evil.example")).status == 200
    # The Origin rule holds here too.
    answer = await unix(path, "GET", "/sessions", origin=EVIL)
    assert answer.status == 403 and b"Origin" in answer.body
    for method, pattern, websocket in routes():
        if pattern == "/shutdown":
            continue
        answer = await unix(path, method, fill(pattern, NO_SUCH), upgrade=websocket)
        assert answer.status not in (401, 403), f"{method} {pattern}: {answer}"


async def test_the_session_socket_upgrade_needs_the_token(socket_daemon: SocketDaemon) -> None:
    client = socket_daemon.client
    session_id = "sock-ws"
    body = new_session_body(session_id, mini_argv("normal"))
    assert (await client.put("/sessions", json=body)).status_code == 200
    assert (await client.post(f"/sessions/{session_id}/start")).status_code == 200
    channel = (await client.get(f"/sessions/{session_id}/channels")).json()
    target = f"/api/channels/{session_id}"

    for token in (None, WRONG):
        expect_401(await unix(channel, "GET", target, token=token, upgrade=True),
                   f"session socket upgrade with token {token}")
    # No token and not even a WebSocket upgrade: still 401, nothing else is looked at.
    expect_401(await unix(channel, "GET", target, token=None), "plain GET")
    refused = await unix(channel, "GET", target, origin=EVIL, upgrade=True)
    assert refused.status == 403 and b"Origin not allowed" in refused.body

    # Raw WebSocket framing (no HTTP upgrade, so no token): closed without a word.
    stream = await trio.open_unix_socket(channel)
    async with stream:
        frame = Connection(ConnectionType.CLIENT).send(
            TextMessage(data=json.dumps(execute_request("1+1", "raw"))))
        await stream.send_all(frame)
        with trio.fail_after(10):
            assert await stream.receive_some(65536) == b""
    assert not (await client.get(f"/sessions/{session_id}")).json()["connected"]

    # With the token: the channel works.
    ws = await RawWebSocket.connect(await trio.open_unix_socket(channel), target, token=TOKEN)
    async with ws.stream:
        await ws.send_text(json.dumps(execute_request("1+1", "ok")))
        with trio.fail_after(30):
            while not is_idle_for(json.loads(await ws.receive_text()), "ok"):
                pass


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example",
                                  "192.168.0.1:{port}", "0.0.0.0:{port}"])
async def test_a_foreign_host_is_refused(daemon: RunningDaemon, host: str) -> None:
    host = host.format(port=daemon.address.port)
    session_id = await daemon.create(mini_argv("normal"))
    for method, target, token, upgrade in [
        ("GET", "/status", None, False),
        ("GET", "/sessions", TOKEN, False),
        ("GET", f"/sessions/{session_id}/channels", TOKEN, True),
    ]:
        answer = await tcp(daemon, method, target, token=token, host=host, upgrade=upgrade)
        assert answer.status == 403, (target, answer)
        assert b"Host not allowed" in answer.body
        assert answer.headers[b"content-type"].startswith(b"text/plain")
    # Without the token the answer is 401 whatever the Host: no client without it learns more.
    expect_401(await tcp(daemon, "GET", "/sessions", token=None, host=host), "no token")


@pytest.mark.parametrize("host", ["localhost:{port}", "localhost", "127.0.0.1:{port}",
                                  "127.0.0.5", "[::1]:{port}", "[::1]"])
async def test_loopback_hosts_are_served(daemon: RunningDaemon, host: str) -> None:
    host = host.format(port=daemon.address.port)
    assert (await tcp(daemon, "GET", "/status", token=None, host=host)).status == 200
    answer = await tcp(daemon, "GET", "/sessions", host=host)
    assert answer.status == 200 and json.loads(answer.body)["total"] == 0


async def test_a_web_page_is_refused(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(mini_argv("normal"))
    for method, target, upgrade in [("GET", "/status", False), ("GET", "/sessions", False),
                                    ("PUT", "/sessions", False),
                                    ("GET", f"/sessions/{session_id}/channels", True)]:
        for origin in (EVIL, "null", daemon.base, "http://localhost"):
            answer = await tcp(daemon, method, target, origin=origin, upgrade=upgrade)
            assert answer.status == 403, (method, target, origin, answer)
            assert b"Origin not allowed" in answer.body
    # No Origin (Positron's Node client sends none): served.
    assert (await tcp(daemon, "GET", f"/sessions/{session_id}/channels",
                      upgrade=True)).status == 101


@pytest.fixture
async def allowing(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    config = daemon_config(tmp_path, allowed_origins=frozenset({"http://localhost:3000"}))
    async for running in running_daemon(nursery, config):
        yield running


async def test_allowed_origins_are_served(allowing: RunningDaemon) -> None:
    session_id = await allowing.create(mini_argv("normal"))
    ok = "http://localhost:3000"
    assert (await tcp(allowing, "GET", "/sessions", origin=ok)).status == 200
    assert (await tcp(allowing, "GET", f"/sessions/{session_id}/channels", origin=ok,
                      upgrade=True)).status == 101
    for other in ("http://localhost:3001", "https://localhost:3000", EVIL):
        assert (await tcp(allowing, "GET", "/sessions", origin=other)).status == 403
    # An allowed page still needs the token.
    expect_401(await tcp(allowing, "GET", "/sessions", origin=ok, token=None), "no token")


@pytest.fixture
async def open_daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    async for running in running_daemon(nursery, daemon_config(tmp_path, token=None)):
        yield running


async def test_token_none_opens_the_api_but_not_to_pages_or_foreign_hosts(
    open_daemon: RunningDaemon,
) -> None:
    async with httpx.AsyncClient(base_url=open_daemon.base) as anonymous:
        body = new_session_body("open", mini_argv("normal"))
        assert (await anonymous.put("/sessions", json=body)).status_code == 200
        assert (await anonymous.get("/sessions")).json()["total"] == 1
    for token in (None, WRONG):
        answer = await tcp(open_daemon, "GET", "/sessions/open/channels", token=token,
                           upgrade=True)
        assert answer.status == 101
    assert (await tcp(open_daemon, "GET", "/sessions", token=None, origin=EVIL)).status == 403
    assert (await tcp(open_daemon, "GET", "/status", token=None,
                      host="evil.example")).status == 403


async def test_a_non_ascii_authorization_header_is_a_401(daemon: RunningDaemon) -> None:
    port = daemon.address.port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /sessions HTTP/1.1\r\nHost: localhost\r\n"
                              b"Authorization: Bearer \xff\xfe\xe9\r\n\r\n")
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 401")
    assert (await daemon.client.get("/status")).status_code == 200  # still serving


# ---- the token stays secret ----------------------------------------------------------------

SECRET = f"secret-{uuid.uuid4().hex}"
OTHER_SECRET = f"other-{uuid.uuid4().hex}"


@pytest.fixture
async def secret_daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    async for running in running_daemon(nursery, daemon_config(tmp_path, token=SECRET)):
        yield running


async def test_the_token_is_never_logged(
    secret_daemon: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(1)  # everything, trace included
    daemon = secret_daemon
    session_id = await daemon.create(mini_argv("normal"))
    assert (await daemon.start(session_id)).status_code == 200
    async with httpx.AsyncClient(base_url=daemon.base) as stranger:
        for headers in ({}, {"Authorization": f"Bearer {OTHER_SECRET}"},
                        {"Authorization": f"Basic {OTHER_SECRET}"}):
            assert (await stranger.get("/sessions", headers=headers)).status_code == 401
            assert (await stranger.post(f"/sessions/{session_id}/interrupt",
                                        headers=headers)).status_code == 401
        refused = await stranger.get("/sessions", headers={
            "Authorization": f"Bearer {SECRET}", "Origin": EVIL})
        assert refused.status_code == 403 and SECRET not in refused.text
    wrong = await tcp(daemon, "GET", f"/sessions/{session_id}/channels", token=OTHER_SECRET,
                      upgrade=True)
    assert wrong.status == 401
    # An error answer, and a failing kernel start.
    bad = await daemon.client.put("/sessions", content=b"{not json")
    assert bad.status_code == 400 and SECRET not in bad.text
    failing = await daemon.create(mini_argv("exit_at_once"))
    failed = await daemon.start(failing)
    assert failed.status_code == 500 and SECRET not in failed.text
    # A WebSocket session, with a message through the kernel.
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.address.port)
    ws = await RawWebSocket.connect(stream, f"/sessions/{session_id}/channels", token=SECRET)
    async with ws.stream:
        await ws.send_text(json.dumps(execute_request("1+1", "logged")))
        with trio.fail_after(30):
            while not is_idle_for(json.loads(await ws.receive_text()), "logged"):
                pass
    assert (await daemon.client.delete(f"/sessions/{failing}")).status_code == 200

    records = caplog.records
    assert any(r.levelno <= logging.DEBUG for r in records), "debug logging was not captured"
    assert any("missing or wrong bearer token" in r.getMessage() for r in records)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s %(pathname)s")
    for record in records:
        text = formatter.format(record) + repr(record.args) + repr(record.__dict__)
        for secret in (SECRET, OTHER_SECRET):
            assert secret not in text, f"a token in a log record: {record.getMessage()!r}"


async def test_the_token_is_not_on_the_kcserver_command_line() -> None:
    work = Path(tempfile.mkdtemp(prefix="kcsec-", dir="/tmp"))
    try:
        token_file = work / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(SECRET)
        conn = work / "conn.json"
        args = ["--connection-file", str(conn), "--transport", "tcp", "--token", str(token_file),
                "--log-level", "debug", "--log-file", str(work / "k.log")]
        async with launch(args, work) as server:
            assert server.doc["bearer_token"] == SECRET
            assert not token_file.exists()  # read, then deleted
            cmdline = " ".join(psutil.Process(server.process.pid).cmdline())
            assert "--token" in cmdline and SECRET not in cmdline
            assert os.stat(conn).st_mode & 0o777 == 0o600
            async with server.client() as client:
                assert (await client.get("/sessions")).status_code == 200
                client.headers["Authorization"] = f"Bearer {OTHER_SECRET}"
                assert (await client.get("/sessions")).status_code == 401
            await stop(server, "sigterm")
            logged = server.output() + (work / "k.log").read_text()
            assert "missing or wrong bearer token" in logged
            assert SECRET not in logged and OTHER_SECRET not in logged
    finally:
        shutil.rmtree(work, ignore_errors=True)
