"""What the tests share: a real daemon and its clients, channels helpers, test kernels.

The `daemon` fixture (conftest.py) runs `running_daemon` with `daemon_config`; a test that needs
another configuration runs them itself. `RawWebSocket` is a minimal client WebSocket over any
Trio stream, driven by wsproto: unlike httpx-ws it shows the test every frame, Pings included,
and answers Pings only when told to (what the keep-alive tests need to play a client that stops
answering).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import trio
import wsproto
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

from kallichore_trio import models
from kallichore_trio.app import ServerAddress, run_daemon
from kallichore_trio.config import Config, Timeouts

KERNELS = Path(__file__).parent / "kernels"
TOKEN = "test-token-0123456789"


@attrs.define
class RunningDaemon:
    address: ServerAddress
    config: Config
    client: httpx.AsyncClient

    @property
    def base(self) -> str:
        assert self.address.base_path is not None
        return self.address.base_path

    @property
    def ws_base(self) -> str:
        return self.base.replace("http://", "ws://")

    async def create(self, argv: list[str] | None = None, **fields: Any) -> str:
        session_id = fields.pop("session_id", f"test-{uuid.uuid4().hex[:8]}")
        body = new_session_body(session_id, argv, **fields)
        response = await self.client.put("/sessions", json=body)
        assert response.status_code == 200, response.text
        return session_id

    async def start(self, session_id: str) -> httpx.Response:
        return await self.client.post(f"/sessions/{session_id}/start", timeout=60)


def ipykernel_argv() -> list[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def new_session_body(session_id: str, argv: list[str] | None = None, **fields: Any) -> dict:
    body = {
        "session_id": session_id,
        "display_name": "Test Python Kernel",
        "language": "python",
        "username": "testuser",
        "input_prompt": "In [{}]: ",
        "continuation_prompt": "   ...: ",
        "argv": ipykernel_argv() if argv is None else argv,
        "session_mode": "console",
        "working_directory": str(Path.cwd()),
        "env": [
            {"action": "replace", "name": "TEST_VAR", "value": "test_value"},
            # debugpy's "frozen modules" warning otherwise lands, now and then, in the first
            # cell's captured stderr and breaks exact-output checks.
            {"action": "replace", "name": "PYDEVD_DISABLE_FILE_VALIDATION", "value": "1"},
        ],
        "connection_timeout": 20,
        "interrupt_mode": "message",
        "protocol_version": "5.3",
        "startup_environment": "none",
    }
    body.update(fields)
    return body


def daemon_config(tmp_path: Path, **overrides: Any) -> Config:
    timeouts = Timeouts(shutdown_request=3.0, terminate=2.0, kill=2.0)
    values: dict[str, Any] = {
        "token": TOKEN,
        "runtime_dir": tmp_path / "runtime",
        "socket_dir": tmp_path,
        "state_dir": tmp_path / "state",
        "timeouts": timeouts,
    }
    values.update(overrides)
    return Config(**values)


async def running_daemon(
    nursery: trio.Nursery, config: Config, **options: Any
) -> AsyncIterator[RunningDaemon]:
    before = child_pids()
    address = await nursery.start(partial(run_daemon, config, **options))
    async with httpx.AsyncClient(
        base_url=address.base_path,
        headers={"Authorization": f"Bearer {config.token}"},
        timeout=30,
    ) as client:
        yield RunningDaemon(address, config, client)
        try:
            await client.post("/shutdown")
        except httpx.HTTPError:
            pass
    # Every kernel this daemon started must be gone once it has shut down.
    with trio.fail_after(30):
        while (left := child_pids() - before) and any(psutil.pid_exists(p) for p in left):
            await trio.sleep(0.1)


def child_pids() -> set[int]:
    me = psutil.Process()
    return {c.pid for c in me.children(recursive=True)}


# ---- the channels protocol ----------------------------------------------------------------


def execute_request(code: str, msg_id: str | None = None) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": msg_id or uuid.uuid4().hex,
            "msg_type": "execute_request",
            "session": "client-session",
            "username": "someone",
            "date": "2026-01-01T00:00:00.000Z",
            "version": "5.3",
        },
        "parent_header": None,
        "channel": "shell",
        "content": {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "metadata": {},
        "buffers": [],
    }


def is_reply_to(frame: dict, msg_id: str, msg_type: str) -> bool:
    return (
        frame.get("kind") == "jupyter"
        and frame["header"]["msg_type"] == msg_type
        and (frame["parent_header"] or {}).get("msg_id") == msg_id
    )


def is_idle_for(frame: dict, msg_id: str) -> bool:
    return is_reply_to(frame, msg_id, "status") and frame["content"]["execution_state"] == "idle"


async def collect_until_done(ws: Any, msg_id: str, timeout: float = 30) -> list[dict]:
    """Frames until both the execute_reply and the idle status for `msg_id` have arrived
    (they come on different sockets, so in either order)."""
    frames: list[dict] = []
    with trio.fail_after(timeout):
        while not (
            any(is_idle_for(f, msg_id) for f in frames)
            and any(is_reply_to(f, msg_id, "execute_reply") for f in frames)
        ):
            frames.append(json.loads(await ws.receive_text()))
    return frames


Frame = dict[str, Any]


def mini_argv(mode: str) -> list[str]:
    return [sys.executable, str(KERNELS / "mini_kernel.py"), "{connection_file}", mode]


def jupyter_message(msg_type: str, content: dict[str, Any], channel: str = "shell",
                    msg_id: str | None = None) -> dict[str, Any]:
    return {
        "header": {"msg_id": msg_id or uuid.uuid4().hex, "msg_type": msg_type},
        "parent_header": None,
        "channel": channel,
        "content": content,
        "metadata": {},
        "buffers": [],
    }


class Channel:
    """A channels WebSocket that keeps every frame it received."""

    def __init__(self, ws: AsyncWebSocketSession) -> None:
        self.ws = ws
        self.frames: list[Frame] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(message))

    async def execute(self, code: str) -> str:
        msg_id = uuid.uuid4().hex
        await self.send(execute_request(code, msg_id))
        return msg_id

    async def receive(self) -> Frame:
        frame = json.loads(await self.ws.receive_text())
        self.frames.append(frame)
        return frame

    async def wait_for(self, predicate: Callable[[Frame], bool], timeout: float = 30) -> Frame:
        """The first frame (from now on) satisfying `predicate`."""
        with trio.fail_after(timeout):
            while True:
                frame = await self.receive()
                if predicate(frame):
                    return frame

    async def wait_done(self, msg_id: str, timeout: float = 30) -> list[Frame]:
        """Frames from now until both execute_reply and idle of `msg_id` arrived."""
        start = len(self.frames)
        with trio.fail_after(timeout):
            while not (
                any(is_idle_for(f, msg_id) for f in self.frames[start:])
                and any(is_reply_to(f, msg_id, "execute_reply") for f in self.frames[start:])
            ):
                await self.receive()
        return self.frames[start:]

    async def drain_until_closed(self, timeout: float = 30) -> list[Frame]:
        start = len(self.frames)
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.receive()
            except WebSocketDisconnect:
                pass
        return self.frames[start:]


@asynccontextmanager
async def open_channel(daemon: RunningDaemon, session_id: str) -> AsyncIterator[Channel]:
    async with aconnect_ws(f"{daemon.ws_base}/sessions/{session_id}/channels",
                           daemon.client) as ws:
        yield Channel(ws)


def kernel_event(frame: Frame, key: str) -> Any:
    return frame.get(key) if frame.get("kind") == "kernel" else None


def is_status(frame: Frame, status: str, reason: object = object) -> bool:
    event = kernel_event(frame, "status")
    if not event or event["status"] != status:
        return False
    return reason is object or event["reason"] == reason


def stream_text(frames: list[Frame], parent: str | None = None) -> str:
    return "".join(
        f["content"]["text"] for f in frames
        if f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream"
        and (parent is None or (f["parent_header"] or {}).get("msg_id") == parent)
    )


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_process_gone(pid: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while not process_gone(pid):
            await trio.sleep(0.05)


async def session_json(daemon: RunningDaemon, session_id: str) -> dict[str, Any]:
    response = await daemon.client.get(f"/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def wait_status(daemon: RunningDaemon, session_id: str, status: str,
                      timeout: float = 20) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while (body := await session_json(daemon, session_id))["status"] != status:
            await trio.sleep(0.05)
    return body


# ---- POST /sessions/{id}/execute ----------------------------------------------------------


async def execute(daemon: RunningDaemon, session_id: str, code: str,
                  **fields: Any) -> httpx.Response:
    return await daemon.client.post(f"/sessions/{session_id}/execute",
                                    json={"code": code, **fields}, timeout=60)


async def execute_ok(daemon: RunningDaemon, session_id: str, code: str,
                     **fields: Any) -> dict[str, Any]:
    response = await execute(daemon, session_id, code, **fields)
    assert response.status_code == 200, response.text
    body = response.json()
    # Every answer is an executeResponse, exactly (strict converter, exact field names).
    assert models.dump(models.converter.structure(body, models.ExecuteResponse)) == body
    return body


async def started(daemon: RunningDaemon) -> str:
    session_id = await daemon.create()
    assert (await daemon.start(session_id)).status_code == 200
    return session_id


# ---- a raw WebSocket client ---------------------------------------------------------------


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


# ---- the kcserver process -----------------------------------------------------------------

KCSERVER = Path(sys.executable).parent / "kcserver"
STARTUP_TIMEOUT = 20.0
#: The daemon waits up to 30 s for kernels after SIGTERM; with none it should be quick.
EXIT_TIMEOUT = 40.0


@attrs.define
class Server:
    process: trio.Process
    doc: dict[str, Any]
    out: Path
    err: Path

    def client(self) -> httpx.AsyncClient:
        headers = {}
        if self.doc.get("bearer_token"):
            headers["Authorization"] = f"Bearer {self.doc['bearer_token']}"
        if "socket_path" in self.doc:
            transport = httpx.AsyncHTTPTransport(uds=self.doc["socket_path"])
            return httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     headers=headers, timeout=10)
        return httpx.AsyncClient(base_url=self.doc["base_path"], headers=headers, timeout=10)

    async def wait_exit(self) -> int:
        with trio.fail_after(EXIT_TIMEOUT):
            return await self.process.wait()

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()


@asynccontextmanager
async def launch_on_state_dir(short_dir: Path, name: str,
                              transport: str = "tcp") -> AsyncIterator[Server]:
    """kcserver with its files in `short_dir/name` and its state directory `short_dir/state`,
    shared by every daemon a test starts there (durability: a successor takes sessions over)."""
    work = short_dir / name
    work.mkdir()
    args = ["--connection-file", str(work / "conn.json"), "--transport", transport,
            "--state-dir", str(short_dir / "state"), "--log-level", "debug"]
    async with launch(args, work) as server:
        yield server


@asynccontextmanager
async def launch(
    args: list[str], work: Path, *, handshake: Path | None = None
) -> AsyncIterator[Server]:
    """Start kcserver, wait for its connection document (file or handshake), and make sure it
    is gone afterwards."""
    # The default --state-dir goes under XDG_STATE_HOME: keep it in the test's directory.
    env = dict(os.environ, XDG_RUNTIME_DIR=str(work), XDG_STATE_HOME=str(work / "state"))
    env.pop("RUST_LOG", None)
    out, err = work / "stdout.txt", work / "stderr.txt"
    listener = None
    if handshake is not None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(str(handshake))
        os.chmod(handshake, 0o600)
        listener.listen(1)
    with out.open("wb") as fout, err.open("wb") as ferr:
        process = await trio.lowlevel.open_process(
            [str(KCSERVER), *args], stdout=fout, stderr=ferr, env=env, cwd=work
        )
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            if listener is not None:
                with listener:
                    doc = await _read_handshake(listener)
            else:
                conn_file = Path(args[args.index("--connection-file") + 1])
                doc = await _poll_connection_file(conn_file, process)
        yield Server(process, doc, out, err)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def _read_handshake(listener: trio.socket.SocketType) -> dict[str, Any]:
    conn, _ = await listener.accept()
    data = bytearray()
    with conn:
        while chunk := await conn.recv(65536):
            data.extend(chunk)
    assert data.endswith(b"\n")
    return json.loads(data)


async def _poll_connection_file(path: Path, process: trio.Process) -> dict[str, Any]:
    while True:
        if process.poll() is not None:
            raise AssertionError(f"kcserver exited early with {process.returncode}")
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            await trio.sleep(0.05)


async def stop(server: Server, how: str) -> None:
    if how == "sigterm":
        server.process.send_signal(signal.SIGTERM)
    else:
        async with server.client() as client:
            response = await client.post("/shutdown")
        assert response.status_code == 200
    assert await server.wait_exit() == 0, server.output()


@asynccontextmanager
async def running_unix_daemon(nursery: trio.Nursery,
                              config: Config) -> AsyncIterator[RunningDaemon]:
    before = child_pids()
    address = await nursery.start(run_daemon, config)
    assert address.socket_path is not None
    transport = httpx.AsyncHTTPTransport(uds=address.socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                 headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=60) as client:
        try:
            yield RunningDaemon(address, config, client)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await client.post("/shutdown")
                except httpx.HTTPError:
                    pass
    with trio.fail_after(30):
        while child_pids() - before:
            await trio.sleep(0.05)


# ---- MCP (tests/integration/test_mcp*.py) ---------------------------------------------

AGENT = types.Implementation(name="test-agent", version="9.9")

async def register(daemon: RunningDaemon, **body: Any) -> dict[str, Any]:
    response = await daemon.client.post("/mcp/workspaces",
                                        json={"display_name": "Test Project", **body})
    assert response.status_code == 200, response.text
    return response.json()


@asynccontextmanager
async def mcp_session(url: str, token: str,
                      agent: types.Implementation = AGENT) -> AsyncIterator[ClientSession]:
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                             timeout=httpx.Timeout(30, read=120))
    async with http, streamable_http_client(url, http_client=http) as (read, write, _):
        async with ClientSession(read, write, client_info=agent) as session:
            await session.initialize()
            yield session


async def started_session(daemon: RunningDaemon, workspace_id: str) -> str:
    session_id = await daemon.create(workspace_id=workspace_id)
    assert (await daemon.start(session_id)).status_code == 200
    return session_id


def text_of(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def call(session: ClientSession, name: str, **arguments: Any) -> types.CallToolResult:
    with trio.fail_after(90):
        return await session.call_tool(name, arguments)
