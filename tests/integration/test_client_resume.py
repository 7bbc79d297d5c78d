"""The client resumes a broken channel (docs/client.md, "Resuming a broken channel"), against
the real daemon and a real ipykernel, on both transports: a cell prints numbered lines while the
test breaks the client's connection (a reset, through `channel.abort_connection()`), and the
client still collects every line once, in order. Through a relay the test controls: a daemon
that is down for a while (framesLost surfaces; past the deadline, ResumeFailed), and one that
ignores `resume` as the reference Kallichore does (the client behaves as it always did)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from kallichore_trio.client import (
    AsyncClient,
    AsyncSession,
    ChannelClosed,
    FramesLost,
    KernelEvent,
    Message,
    ResumeFailed,
    ServerAddress,
    SupervisorRestarted,
    Timeouts,
)
from kallichore_trio.client.pytest_plugin import KERNEL_ENV
from kallichore_trio.config import OutboxLimits
from tests.helpers import (
    STARTUP_TIMEOUT,
    TOKEN,
    RunningDaemon,
    daemon_config,
    launch,
    running_daemon,
    running_unix_daemon,
    stop,
    wait_status,
)

LINES = 20_000
BREAKS = (2_000, 6_000, 10_000, 14_000, 18_000)  # lines received before each break
PRINT_LINES = "for i in range({n}):\n    print(i, flush=True)\n"


class LineCounter:
    """Collects an execution's stdout from its messages; `reached(n)` waits for n lines."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.lines = 0
        self._waiting: list[tuple[int, trio.Event]] = []

    def __call__(self, msg: Message) -> None:
        if msg.msg_type == "stream" and msg.content.get("name") == "stdout":
            text = str(msg.content.get("text", ""))
            self.parts.append(text)
            self.lines += text.count("\n")
            for wanted, event in self._waiting:
                if self.lines >= wanted:
                    event.set()

    async def reached(self, lines: int, timeout: float = 60) -> None:
        event = trio.Event()
        self._waiting.append((lines, event))
        if self.lines >= lines:
            event.set()
        with trio.fail_after(timeout):
            await event.wait()

    @property
    def text(self) -> str:
        return "".join(self.parts)


def numbered(n: int) -> str:
    return "".join(f"{i}\n" for i in range(n))


async def print_and_break(session: AsyncSession, breaks: tuple[int, ...]) -> tuple[str, int]:
    """Run the printing cell, breaking the connection after each count of lines in `breaks`;
    returns what was collected and how many connections were replaced."""
    counter = LineCounter()
    await session.attach()
    channel = session.channel
    assert channel is not None
    async with trio.open_nursery() as nursery:
        async def breaker() -> None:
            for lines in breaks:
                await counter.reached(lines)
                await channel.abort_connection()

        nursery.start_soon(breaker)
        result = await session.execute(PRINT_LINES.format(n=LINES), on_message=counter)
    assert result.ok and not result.may_be_incomplete, result.notices
    assert result.stdout == counter.text
    # The last break may come after the client read the end: the next request goes out on
    # the connection that replaces it.
    assert (await session.execute("print('after')")).stdout == "after\n"
    assert session.channel is channel  # the same attach throughout
    return counter.text, channel.reconnects


async def test_a_broken_tcp_connection_is_resumed_without_loss_or_repeat(
        daemon: RunningDaemon) -> None:
    async with AsyncClient(ServerAddress(daemon.base, TOKEN)) as kc:
        session = await kc.start_kernel(env=KERNEL_ENV)
        text, reconnects = await print_and_break(session, BREAKS)
        assert text == numbered(LINES)
        assert reconnects == len(BREAKS)
        await session.shutdown()


async def test_a_broken_unix_socket_connection_is_resumed_without_loss_or_repeat(
        nursery: trio.Nursery, short_dir: Path) -> None:
    config = daemon_config(short_dir, transport="socket")
    async with running_unix_daemon(nursery, config) as unix_daemon:
        address = ServerAddress("http://localhost", TOKEN,
                                uds=str(unix_daemon.address.socket_path))
        async with AsyncClient(address) as kc:
            session = await kc.start_kernel(env=KERNEL_ENV)
            text, reconnects = await print_and_break(session, BREAKS)
            assert text == numbered(LINES)
            assert reconnects == len(BREAKS)
            await session.shutdown()


# ---- through a relay the test controls --------------------------------------------------


class Relay:
    """TCP between the client and the daemon. `down`: new connections are closed at once (a
    daemon that is not there); `strip_resume`: `resume=N` is cut from upgrade requests (a
    daemon that ignores it, as the reference Kallichore does)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.down = False
        self.strip_resume = False
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        if self.down:
            await downstream.aclose()
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await downstream.aclose()
            return
        async with downstream, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream, self._rewrite,
                               nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, downstream, None, nursery.cancel_scope)

    def _rewrite(self, data: bytes) -> bytes:
        if self.strip_resume:
            data = re.sub(rb"\?resume=\d+", b"", data, count=1)
        return data

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream,
                    rewrite: Callable[[bytes], bytes] | None, scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(rewrite(data) if rewrite is not None else data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one side ended: end both, as a connection would


@pytest.fixture
async def relay(nursery: trio.Nursery, daemon: RunningDaemon) -> Relay:
    port = int(daemon.base.rsplit(":", 1)[1].split("/")[0])
    relay = Relay(port)
    await nursery.start(relay.serve)
    return relay


def through(relay: Relay) -> ServerAddress:
    return ServerAddress(f"http://127.0.0.1:{relay.port}", TOKEN)


async def test_a_daemon_that_ignores_resume_gets_the_old_behaviour(relay: Relay) -> None:
    relay.strip_resume = True
    async with AsyncClient(through(relay)) as kc:
        session = await kc.start_kernel(env=KERNEL_ENV)
        counter = LineCounter()
        await session.attach()
        channel = session.channel
        assert channel is not None
        async with trio.open_nursery() as nursery:
            async def breaker() -> None:
                await counter.reached(500)
                assert channel.state.numbered is False  # no seq: no acks were sent
                await channel.abort_connection()

            nursery.start_soon(breaker)
            with pytest.raises(ChannelClosed) as caught:
                await session.execute(PRINT_LINES.format(n=LINES), on_message=counter)
        assert not isinstance(caught.value, ResumeFailed) and not caught.value.evicted
        assert channel.reconnects == 0 and channel.ended
        # The next call opens a new channel, as it always did.
        assert (await session.execute("print('again')")).stdout == "again\n"
        await session.shutdown()


async def test_a_daemon_gone_past_the_deadline_ends_with_resume_failed(relay: Relay) -> None:
    async with AsyncClient(through(relay), timeouts=Timeouts(reconnect=2.0)) as kc:
        session = await kc.start_kernel(env=KERNEL_ENV)
        counter = LineCounter()
        async with trio.open_nursery() as nursery:
            async def breaker() -> None:
                await counter.reached(1)
                channel = session.channel
                assert channel is not None and channel.state.numbered is True
                relay.down = True
                await channel.abort_connection()

            nursery.start_soon(breaker)
            with pytest.raises(ResumeFailed) as caught:
                await session.execute("import time\nprint('started', flush=True)\n"
                                      "time.sleep(120)", on_message=counter)
        assert caught.value.attempts >= 1 and caught.value.cause is not None
        relay.down = False
        await session.shutdown()


@pytest.fixture
async def small_outbox_relay(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[
        tuple[Relay, RunningDaemon]]:
    config = daemon_config(tmp_path, outbox=OutboxLimits(max_frames=2_000))
    async for running in running_daemon(nursery, config):
        port = int(running.base.rsplit(":", 1)[1].split("/")[0])
        relay = Relay(port)
        await nursery.start(relay.serve)
        yield relay, running


async def test_frames_shed_while_disconnected_are_reported(
        small_outbox_relay: tuple[Relay, RunningDaemon]) -> None:
    relay, daemon = small_outbox_relay
    notices: list[KernelEvent] = []
    async with AsyncClient(through(relay), timeouts=Timeouts(reconnect=120.0)) as kc:
        session = await kc.start_kernel(env=KERNEL_ENV)
        session.on_notice = notices.append
        counter = LineCounter()
        async with trio.open_nursery() as nursery:
            async def breaker() -> None:
                await counter.reached(100)
                channel = session.channel
                assert channel is not None
                relay.down = True
                await channel.abort_connection()
                # The kernel prints on, and finishes, while the client cannot connect: the
                # outbox (2,000 frames) sheds most of the 20,000 lines.
                await wait_status(daemon, session.id, "idle", timeout=60)
                relay.down = False

            nursery.start_soon(breaker)
            result = await session.execute(PRINT_LINES.format(n=LINES), on_message=counter)
        assert result.ok and result.may_be_incomplete
        lost = [n for n in result.notices if isinstance(n, FramesLost)]
        assert lost and lost == notices and not any(n.history for n in lost)
        received = [int(line) for line in counter.text.splitlines()]
        missing = sum(n.last - n.first + 1 for n in lost)
        assert received == sorted(set(received))  # in order, none twice
        assert received[-1] == LINES - 1 and len(received) < LINES
        assert missing >= LINES - len(received)  # every gap was reported (ranges may hold more)
        await session.shutdown()


# ---- across a daemon crash ----------------------------------------------------------------


async def test_the_client_resumes_across_a_daemon_crash(short_dir: Path) -> None:
    """kcserver is SIGKILLed while the client is attached; a new one on the same port and
    state directory takes the session over, and the client, which kept trying, resumes: it
    is told of the restart and of what the dead daemon held, then runs code as before."""
    token = "resume-across-a-crash"

    def args(name: str, port: int = 0) -> tuple[list[str], Path]:
        work = short_dir / name
        work.mkdir()
        (work / "token").write_text(token)  # read, then deleted, by kcserver
        return (["--connection-file", str(work / "conn.json"), "--transport", "tcp",
                 "--state-dir", str(short_dir / "state"), "--token", str(work / "token"),
                 "--port", str(port)], work)

    notices: list[KernelEvent] = []
    kernel_pid = None
    try:
        async with launch(*args("a")) as first:
            port = int(first.doc["base_path"].rsplit(":", 1)[1])
            async with AsyncClient(ServerAddress(f"http://127.0.0.1:{port}", token),
                                   timeouts=Timeouts(reconnect=120.0)) as kc:
                session = await kc.start_kernel(env=KERNEL_ENV)
                kernel_pid = (await session.info()).process_id
                session.on_notice = notices.append
                assert (await session.execute("x = 6 * 7; print('before')")).stdout == (
                    "before\n")
                channel = session.channel
                assert channel is not None and channel.state.numbered is True
                async with session.events() as events:
                    first.process.send_signal(signal.SIGKILL)
                    with trio.fail_after(STARTUP_TIMEOUT):
                        await first.process.wait()
                    async with launch(*args("b", port)) as second:
                        with trio.fail_after(60):
                            async for event in events:
                                if isinstance(event, FramesLost):
                                    break
                        assert (await session.execute("print(x)")).stdout == "42\n"
                        assert session.channel is channel and channel.reconnects == 1
                        await session.shutdown()
                        await stop(second, "sigterm")
        restarted, lost = notices
        assert isinstance(restarted, SupervisorRestarted) and not restarted.history
        assert restarted.previous_server_id == first.doc["server_id"]
        assert isinstance(lost, FramesLost) and not lost.history
    finally:
        if kernel_pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(kernel_pid, signal.SIGKILL)
