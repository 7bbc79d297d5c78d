"""Keep-alive on the TCP channel: Pings are counted, a silent or stuck client is dropped.

The client here is a raw wsproto WebSocket over a TCP stream, so the test decides whether it
answers Pings and whether it reads at all.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from tests.helpers import (
    RawWebSocket,
    RunningDaemon,
    auth_headers,
    daemon_config,
    execute_request,
    is_idle_for,
    open_channel,
    running_daemon,
    session_json,
    stream_text,
)

PING_PERIOD = 0.1


@pytest.fixture
async def pinging_daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    config = daemon_config(tmp_path)
    timeouts = attrs.evolve(config.timeouts, client_ping=PING_PERIOD, client_write=0.5)
    async for running in running_daemon(nursery, attrs.evolve(config, timeouts=timeouts)):
        yield running


async def started(daemon: RunningDaemon) -> str:
    session_id = await daemon.create()
    assert (await daemon.start(session_id)).status_code == 200
    return session_id


async def connect(daemon: RunningDaemon, session_id: str, **kwargs: object) -> RawWebSocket:
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.address.port)
    return await RawWebSocket.connect(stream, f"/sessions/{session_id}/channels",
                                      token=daemon.config.token, **kwargs)


async def wait_connected(daemon: RunningDaemon, session_id: str, want: bool) -> None:
    with trio.fail_after(20):
        while (await session_json(daemon, session_id))["connected"] is not want:
            await trio.sleep(0.02)


async def test_a_client_answering_pings_stays_connected(pinging_daemon: RunningDaemon) -> None:
    daemon = pinging_daemon
    session_id = await started(daemon)
    ws = await connect(daemon, session_id)
    async with ws.stream:
        with trio.move_on_after(20 * PING_PERIOD):
            await ws.read_until_closed()
        # Many more Pings than the 3 a silent client is allowed, each an 8-byte counter.
        assert len(ws.pings) > 10
        assert ws.pings[:3] == [n.to_bytes(8, "big") for n in (1, 2, 3)]
        assert (await session_json(daemon, session_id))["connected"] is True
        msg_id = "after-pings"
        await ws.send_text(json.dumps(execute_request("print('still here')", msg_id)))
        frames = []
        with trio.fail_after(30):
            while not any(is_idle_for(f, msg_id) for f in frames):
                frames.append(json.loads(await ws.receive_text()))
        assert stream_text(frames, msg_id) == "still here\n"


async def test_a_client_that_stops_answering_pings_is_dropped(
    pinging_daemon: RunningDaemon,
) -> None:
    daemon = pinging_daemon
    session_id = await started(daemon)
    ws = await connect(daemon, session_id, answer_pings=False)
    async with ws.stream:
        assert (await session_json(daemon, session_id))["connected"] is True
        with trio.fail_after(20):
            await ws.read_until_closed()  # returns once the daemon closes the connection
        # More than 3 unanswered (the 4th may have been sent already), and not many more.
        assert 4 <= len(ws.pings) <= 6
    await wait_connected(daemon, session_id, False)
    # The session is unharmed: the next client runs code.
    async with open_channel(daemon, session_id) as channel:
        msg_id = await channel.execute("print('next client')")
        frames = await channel.wait_done(msg_id)
    assert stream_text(frames, msg_id) == "next client\n"


async def test_a_client_that_stops_reading_is_dropped_and_the_next_gets_the_rest(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Pings off (a long period), so only the stuck write can end this client.
    config = daemon_config(tmp_path)
    timeouts = attrs.evolve(config.timeouts, client_ping=3600.0, client_write=0.5)
    async for daemon in running_daemon(nursery, attrs.evolve(config, timeouts=timeouts)):
        session_id = await started(daemon)
        ws = await connect(daemon, session_id)
        msg_id = "big-output"
        # About 40 MB: far more than the loopback socket buffers hold, so writes block.
        code = "for i in range(4000): print(f'{i:05d}' + 'x' * 10000, flush=True)"
        await ws.send_text(json.dumps(execute_request(code, msg_id)))
        await wait_connected(daemon, session_id, False)  # nobody read: the write timed out
        await ws.stream.aclose()
        async with open_channel(daemon, session_id) as channel:
            frames = await channel.wait_done(msg_id, timeout=120)
        # The rest of the output arrived, ending with the last line.
        assert stream_text(frames, msg_id).splitlines()[-1] == "03999" + "x" * 10000


async def test_permessage_deflate_is_declined(daemon: RunningDaemon) -> None:
    session_id = await daemon.create()
    ws = await connect(daemon, session_id, extensions=[PerMessageDeflate()])
    async with ws.stream:
        assert ws.accepted is not None
        assert ws.accepted.extensions == []


async def test_a_request_sent_with_the_upgrade_is_answered(daemon: RunningDaemon) -> None:
    """Frames that arrive before the 101 (in the same write as the upgrade request) reach the
    session: Hypercorn would answer them with a 400, the handover keeps them."""
    session_id = await started(daemon)
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.address.port)
    async with stream:
        ws = RawWebSocket(stream)
        request = ws.ws.send(Request(host="localhost", target=f"/sessions/{session_id}/channels",
                                     extra_headers=auth_headers(daemon.config.token)))
        msg_id = "sent-with-the-upgrade"
        frame = Connection(ConnectionType.CLIENT).send(
            TextMessage(data=json.dumps(execute_request("6*7", msg_id))))
        await stream.send_all(request + frame)
        results = []
        with trio.fail_after(60):
            while not is_idle_for(message := json.loads(await ws.receive_text()), msg_id):
                if message.get("header", {}).get("msg_type") == "execute_result":
                    results.append(message["content"]["data"]["text/plain"])
        assert results == ["42"]
