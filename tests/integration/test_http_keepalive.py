"""HTTP/1.1 keep-alive: every request on one connection gets its answer (issue 19).

The defect: a response sent before the request body had arrived (a 404 or 405 never reads the
body) left the connection half-recycled; the next request on it got no answer. The cause and the
fix are described in kallichore_trio/transport/hypercorn_ext.py (`KeepAliveH11Protocol`).

Most tests drive the connection with h11 by hand (`RawHttp`) so that they decide exactly when
each byte leaves: a body sent only after its response was read, a body in pieces, a client that
leaves mid-body. The daemon runs in the test's own Trio loop, so
`trio.testing.wait_all_tasks_blocked()` means "the daemon has processed everything sent so far",
which makes "slowly" deterministic without sleeps, and lets a test send a body only once the
daemon is completely done with the answer it already sent (`settle`), the order that hung.

The report's sequence was `GET /api`, `POST /mcp/workspaces`, `PUT /sessions`, on a daemon
without the MCP routes; `/mcp/workspaces` is a route now, so the tests send the POST to
`/mcp/frontends` (0.1.68's shape, which we do not serve) to keep its 404.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from kallichore_trio import app as app_module
from kallichore_trio.transport import hypercorn_ext
from tests.helpers import TOKEN, RunningDaemon, daemon_config, new_session_body, running_daemon

#: Every wait on the daemon in this module is bounded by this (a hang fails, it does not stall).
DEADLINE = 10
LARGE = 1 << 20  # a body several reads long


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    informational: tuple[int, ...] = ()


class RawHttp:
    """One HTTP/1.1 client connection driven by h11, byte by byte as the test says."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    @asynccontextmanager
    async def connect(cls, daemon: RunningDaemon) -> AsyncIterator[RawHttp]:
        host, port = _host_port(daemon)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            yield cls(stream)

    @property
    def local_port(self) -> int:
        return self.stream.socket.getsockname()[1]

    async def send_head(self, method: str, target: str, *, length: int | None = None,
                        expect_continue: bool = False, token: str = TOKEN) -> None:
        headers = [("host", "127.0.0.1"), ("authorization", f"Bearer {token}")]
        if length is not None:
            headers.append(("content-length", str(length)))
            headers.append(("content-type", "application/json"))
        if expect_continue:
            headers.append(("expect", "100-continue"))
        await self._send(h11.Request(method=method, target=target, headers=headers))

    async def send_body(self, data: bytes) -> None:
        if data:
            await self._send(h11.Data(data=data))

    async def end_body(self) -> None:
        await self._send(h11.EndOfMessage())

    async def read_response(self) -> Answer:
        """Everything up to the end of the next final response (1xx ones are collected)."""
        informational: list[int] = []
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(1 << 16))
            elif isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, headers, bytes(body), tuple(informational))
            else:
                raise AssertionError(f"unexpected {event!r} while reading a response")

    async def read_continue(self) -> None:
        """Wait for the server's 100 Continue, as a client that sent `Expect` does."""
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self.stream.receive_some(1 << 16))
        assert isinstance(event, h11.InformationalResponse), event
        assert event.status_code == 100

    def next_cycle(self) -> None:
        """Both sides are done with this exchange: the connection is ready for the next one."""
        assert (self.h11.our_state, self.h11.their_state) == (h11.DONE, h11.DONE), (
            self.h11.states)
        self.h11.start_next_cycle()

    async def request(self, method: str, target: str, body: bytes | None = None) -> Answer:
        """A whole request sent at once, then its whole response."""
        await self.send_head(method, target, length=None if body is None else len(body))
        if body is not None:
            await self.send_body(body)
        await self.end_body()
        answer = await self.read_response()
        self.next_cycle()
        return answer

    async def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)


async def settle() -> None:
    """Until the daemon (in this Trio loop) has done all it can with what it has received."""
    await trio.testing.wait_all_tasks_blocked()


def _host_port(daemon: RunningDaemon) -> tuple[str, int]:
    url = httpx.URL(daemon.base)
    assert url.host and url.port
    return url.host, url.port


def _session_body(session_id: str) -> bytes:
    return json.dumps(new_session_body(session_id)).encode()


def _new_id() -> str:
    return f"ka-{uuid.uuid4().hex[:8]}"


async def _fresh_connection_serves(daemon: RunningDaemon) -> None:
    """Another connection gets its answers: the daemon serves on, whatever the first one did."""
    async with RawHttp.connect(daemon) as other:
        assert (await other.request("GET", "/status")).status == 200
        session_id = _new_id()
        assert (await other.request("PUT", "/sessions", _session_body(session_id))).status == 200
        assert (await other.request("DELETE", f"/sessions/{session_id}")).status == 200


# --- the reported sequence -------------------------------------------------------------------


async def test_request_after_a_body_the_404_left_unread(daemon: RunningDaemon) -> None:
    """The defect, deterministically: the 404 goes out before the body has arrived (the client
    sends the body only once it has read the 404), then the next request on the connection."""
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            assert (await client.request("GET", "/api")).status == 404
            body = b'{"workspace": "x"}'
            await client.send_head("POST", "/mcp/frontends", length=len(body))
            assert (await client.read_response()).status == 404
            await settle()
            await client.send_body(body)
            await client.end_body()
            client.next_cycle()
            answer = await client.request("PUT", "/sessions", _session_body("after-404"))
            assert answer.status == 200, answer
            assert json.loads(answer.body) == {"session_id": "after-404"}
            assert (await client.request("GET", "/sessions/after-404")).status == 200


async def _late(payload: bytes) -> AsyncIterator[bytes]:
    """A body that leaves only once the daemon has answered its request's head."""
    await settle()
    yield payload


async def test_reported_sequence_async_client_one_connection(daemon: RunningDaemon) -> None:
    """GET 404, POST-with-body 404, PUT /sessions, over and over on one httpx connection; every
    other round the POST body leaves after the 404 (the order that hung), else with the head."""
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    async with httpx.AsyncClient(base_url=daemon.base, transport=transport,
                                 headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=DEADLINE) as client:
        ports: set[int] = set()
        for round_ in range(20):
            payload = json.dumps({"round": round_}).encode()
            content = _late(payload) if round_ % 2 else payload
            with trio.fail_after(DEADLINE):
                responses = [
                    await client.get("/api"),
                    await client.post("/mcp/frontends", content=content, headers={
                        "content-type": "application/json",
                        "content-length": str(len(payload))}),
                    await client.put("/sessions", json=new_session_body(f"async-{round_}")),
                ]
            assert [r.status_code for r in responses] == [404, 404, 200]
            ports |= {r.extensions["network_stream"].get_extra_info("client_addr")[1]
                      for r in responses}
        assert len(ports) == 1, f"the client used {len(ports)} connections"


async def test_reported_sequence_sync_client_one_connection(daemon: RunningDaemon) -> None:
    """The report itself: a synchronous httpx.Client (which writes a request's head and body
    separately, so the 404 often goes out before the body arrives), from a thread."""

    def rounds() -> set[int]:
        ports: set[int] = set()
        with httpx.Client(base_url=daemon.base, headers={"Authorization": f"Bearer {TOKEN}"},
                          limits=httpx.Limits(max_connections=1),
                          timeout=DEADLINE) as client:
            for round_ in range(300):  # 900 requests: Hypercorn closes a connection at 1000
                responses = [
                    client.get("/api"),
                    client.post("/mcp/frontends", json={"round": round_}),
                    client.put("/sessions", json=new_session_body(f"sync-{round_}")),
                ]
                assert [r.status_code for r in responses] == [404, 404, 200]
                ports |= {r.extensions["network_stream"].get_extra_info("client_addr")[1]
                          for r in responses}
        return ports

    with trio.fail_after(3 * DEADLINE):
        ports = await trio.to_thread.run_sync(rounds)
    assert len(ports) == 1, f"the client used {len(ports)} connections"


# --- bodies: unread, slow, announced with Expect, abandoned -----------------------------------


@pytest.mark.parametrize("size", [0, 7, LARGE])
async def test_unread_body_of_any_size_then_next_request(daemon: RunningDaemon,
                                                         size: int) -> None:
    body = b"x" * size
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            await client.send_head("PUT", "/no/such/route", length=size)
            assert (await client.read_response()).status == 404
            await settle()
            await client.send_body(body)
            await client.end_body()
            client.next_cycle()
            # The same again, body sent with the head this time, and on a known path (405).
            assert (await client.request("POST", "/status", body)).status == 405
            assert (await client.request("GET", "/status")).status == 200


async def test_body_left_unread_by_a_refused_token(daemon: RunningDaemon) -> None:
    """A 401 answers before the body too (the route checks the token first)."""
    body = _session_body("never")
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            await client.send_head("PUT", "/sessions", length=len(body), token="wrong")
            assert (await client.read_response()).status == 401
            await settle()
            await client.send_body(body)
            await client.end_body()
            client.next_cycle()
            assert (await client.request("GET", "/sessions/never")).status == 404
            assert (await client.request("PUT", "/sessions", body)).status == 200


async def test_body_in_pieces(daemon: RunningDaemon) -> None:
    """A body that arrives a piece at a time, the daemon idle between pieces: read whole by a
    route, drained after a 404."""
    valid = _session_body("in-pieces")
    unread = b"y" * 5000
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            await client.send_head("PUT", "/sessions", length=len(valid))
            for start in range(0, len(valid), 50):
                await client.send_body(valid[start:start + 50])
                await settle()
            await client.end_body()
            assert (await client.read_response()).status == 200
            client.next_cycle()

            await client.send_head("POST", "/mcp/frontends", length=len(unread))
            assert (await client.read_response()).status == 404
            await settle()
            for start in range(0, len(unread), 1000):
                await client.send_body(unread[start:start + 1000])
                await settle()
            await client.end_body()
            client.next_cycle()
            assert (await client.request("GET", "/sessions/in-pieces")).status == 200


async def test_expect_100_continue(daemon: RunningDaemon) -> None:
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            # A route that reads the body: 100 Continue, then the body, then the answer.
            valid = _session_body("expected")
            await client.send_head("PUT", "/sessions", length=len(valid), expect_continue=True)
            await client.read_continue()
            await client.send_body(valid)
            await client.end_body()
            assert (await client.read_response()).status == 200
            client.next_cycle()
            # A 404 that never reads it: the client was told to continue, so it sends the body
            # anyway after the answer, and the connection carries on.
            await client.send_head("POST", "/mcp/frontends", length=LARGE, expect_continue=True)
            await client.read_continue()
            assert (await client.read_response()).status == 404
            await settle()
            await client.send_body(b"z" * LARGE)
            await client.end_body()
            client.next_cycle()
            assert (await client.request("GET", "/sessions/expected")).status == 200


@pytest.mark.parametrize("answered_first", [False, True])
async def test_client_leaves_mid_body(daemon: RunningDaemon, answered_first: bool) -> None:
    """A client that closes its connection halfway through a body (to a route that reads it,
    or after a 404 that does not); other connections are served on."""
    with trio.fail_after(DEADLINE):
        async with RawHttp.connect(daemon) as client:
            if answered_first:
                await client.send_head("POST", "/mcp/frontends", length=LARGE)
                assert (await client.read_response()).status == 404
            else:
                await client.send_head("PUT", "/sessions", length=LARGE)
            await client.send_body(b"{" * (LARGE // 2))
            await settle()
        await settle()
        await _fresh_connection_serves(daemon)


# --- the idle timeout, which the same defect disarmed -------------------------------------------


@pytest.fixture
def short_keep_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypercorn's keep-alive timeout cut short, so that a test sees it fire."""
    original = app_module._hypercorn_config

    def configured(*args: Any, **kwargs: Any) -> Any:
        config = original(*args, **kwargs)
        config.keep_alive_timeout = 0.2
        return config

    monkeypatch.setattr(app_module, "_hypercorn_config", configured)


@pytest.mark.parametrize("target", ["/status", "/api"])
async def test_idle_connection_closed_after_keep_alive_timeout(
        short_keep_alive: None, daemon: RunningDaemon, target: str) -> None:
    """After a request, an idle connection is closed once the keep-alive timeout passes (the
    app's cancellation used to stop Hypercorn re-arming that timer after every request)."""
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            await client.request("GET", target)
            assert await client.stream.receive_some(1 << 16) == b""


async def test_body_never_sent_after_the_answer(short_keep_alive: None,
                                                daemon: RunningDaemon) -> None:
    """A client that announced a body, got its 404 and never sends the body: the keep-alive
    timeout closes the connection rather than the daemon waiting for the body forever."""
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            await client.send_head("POST", "/mcp/frontends", length=1000)
            assert (await client.read_response()).status == 404
            await client.send_body(b"x" * 10)
            assert await client.stream.receive_some(1 << 16) == b""


async def test_unread_body_beyond_the_drain_limit(daemon: RunningDaemon) -> None:
    """An unread body is dropped only up to a limit; past it the daemon closes the connection
    (the client finds out by a failed write or the end of the stream) and serves on."""
    limit = hypercorn_ext._DRAIN_LIMIT
    chunk = b"x" * (1 << 20)
    sent = 0
    async with RawHttp.connect(daemon) as client:
        with trio.fail_after(DEADLINE):
            await client.send_head("PUT", "/no/such/route", length=4 * limit)
            assert (await client.read_response()).status == 404
            try:
                while sent < 4 * limit:
                    await client.stream.send_all(chunk)
                    sent += len(chunk)
            except trio.BrokenResourceError:
                pass
    # Past the limit by no more than the socket buffers hold.
    assert limit <= sent < 2 * limit
    with trio.fail_after(DEADLINE):
        await _fresh_connection_serves(daemon)


# --- generated sequences -----------------------------------------------------------------------

#: Bounded and reproducible: every run tries the same sequences, and no timing is judged. No
#: shrinking: a hang costs a whole deadline per attempt, and the failing sequence (a dozen
#: steps at most, the same every run) is readable as it is.
SEQUENCES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


@attrs.frozen
class Step:
    """One request. `expected` is None where the runner knows it (sessions it created)."""

    kind: str
    method: str = "GET"
    target: str = "/status"
    body: bytes | None = None
    #: "with_head": all at once; "after_answer": the body only once the answer was read
    #: and the daemon is done with it (a route that refuses without reading); "right_after":
    #: as soon as the answer was read, racing the daemon's end of the exchange; "pieces": a
    #: piece at a time.
    timing: str = "with_head"
    expect_continue: bool = False
    expected: int | None = None


bodies = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=LARGE).map(lambda n: b"b" * n),
)
timings = st.sampled_from(["with_head", "after_answer", "right_after", "pieces"])


@st.composite
def refused(draw: st.DrawFn) -> Step:
    """404s and 405s: answered without the body being read."""
    method, target, status = draw(st.sampled_from([
        ("GET", "/api", 404), ("POST", "/mcp/frontends", 404), ("PUT", "/no/such/route", 404),
        ("DELETE", "/sessions/x/y/z", 404), ("POST", "/status", 405), ("PUT", "/status", 405),
        ("POST", "/sessions", 405), ("DELETE", "/sessions", 405),
    ]))
    body = draw(bodies)
    timing = draw(timings) if body is not None else "with_head"
    return Step("refused", method, target, body, timing, draw(st.booleans()), status)


@st.composite
def malformed(draw: st.DrawFn) -> Step:
    target = draw(st.sampled_from(["/sessions", "/client_heartbeat", "/server_configuration"]))
    method = "PUT" if target == "/sessions" else "POST"
    junk = draw(st.sampled_from([b"{", b"{not json", b"[1, 2", b"\xff\xfe", b'{"a": }']))
    timing = draw(st.sampled_from(["with_head", "pieces"]))
    return Step("malformed", method, target, junk, timing, draw(st.booleans()), 400)


light = st.sampled_from([
    Step("light", "GET", "/status", expected=200),
    Step("light", "GET", "/sessions", expected=200),
    Step("create", "PUT", "/sessions"),
    Step("delete", "DELETE", "/sessions"),
    Step("other_connection"),
])
steps = st.lists(st.one_of(refused(), malformed(), light), min_size=1, max_size=12)


async def _run_step(client: RawHttp, step: Step) -> Answer:
    body = step.body
    await client.send_head(step.method, step.target, length=None if body is None else len(body),
                           expect_continue=step.expect_continue and body is not None)
    if step.expect_continue and body is not None:
        await client.read_continue()
    if body is None:
        await client.end_body()
        answer = await client.read_response()
    elif step.timing in ("after_answer", "right_after"):
        answer = await client.read_response()
        if step.timing == "after_answer":
            await settle()
        await client.send_body(body)
        await client.end_body()
    else:
        piece = max(1, len(body) if step.timing == "with_head" else len(body) // 4)
        for start in range(0, len(body), piece):
            await client.send_body(body[start:start + piece])
            if step.timing == "pieces":
                await settle()
        await client.end_body()
        answer = await client.read_response()
    client.next_cycle()
    return answer


@SEQUENCES
@given(sequence=steps, leave_mid_body=st.booleans())
async def test_generated_sequences_on_one_connection(
        sequence: list[Step], leave_mid_body: bool) -> None:
    """Any mix of refused, malformed and ordinary requests on one connection: each answered
    within the deadline, the daemon serving other connections throughout and after."""
    # pytest-trio runs each example in a Trio loop of its own, and a fixture's daemon would not
    # outlive the first: every example starts its own.
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            async for daemon in running_daemon(nursery, daemon_config(Path(tmp))):
                await _run_sequence(daemon, sequence, leave_mid_body)


async def _run_sequence(daemon: RunningDaemon, sequence: list[Step],
                        leave_mid_body: bool) -> None:
    created: list[str] = []
    async with RawHttp.connect(daemon) as client:
        port = client.local_port
        for step in sequence:
            with trio.fail_after(DEADLINE):
                if step.kind == "other_connection":
                    await _fresh_connection_serves(daemon)
                    continue
                if step.kind == "create":
                    created.append(_new_id())
                    step = attrs.evolve(step, body=_session_body(created[-1]), expected=200)
                elif step.kind == "delete":
                    target = f"/sessions/{created.pop() if created else 'never-created'}"
                    expected = 200 if not target.endswith("never-created") else 404
                    step = attrs.evolve(step, target=target, expected=expected)
                event(f"{step.kind} {step.timing}")
                answer = await _run_step(client, step)
            assert answer.status == step.expected, (step.method, step.target, answer)
            assert client.local_port == port
        if leave_mid_body:
            await client.send_head("PUT", "/sessions", length=LARGE)
            await client.send_body(b"{" * 1000)
            await settle()
    with trio.fail_after(DEADLINE):
        await _fresh_connection_serves(daemon)
