"""Per-session Unix sockets (the socket transport): one socket per session, for its lifetime.

Every client here connects the way Positron does: an HTTP upgrade on the per-session socket
(`ws+unix://<path>:/api/channels/<id>`) carrying the bearer token.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from httpx_ws import aconnect_ws

from kallichore_trio.transport import unix
from kallichore_trio.transport.websocket import ClientConnection
from tests.helpers import (
    TOKEN,
    Channel,
    RunningDaemon,
    daemon_config,
    jupyter_message,
    open_channel,
    running_daemon,
    running_unix_daemon,
    session_json,
    stream_text,
)

EVICTED = {"kind": "kernel", "clientDisconnected": "Another client is connecting to this session."}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def unix_daemon(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[RunningDaemon]:
    async with running_unix_daemon(nursery, daemon_config(short_dir, transport="socket")) as d:
        yield d


async def channels_path(daemon: RunningDaemon, session_id: str) -> str:
    response = await daemon.client.get(f"/sessions/{session_id}/channels")
    assert response.status_code == 200, response.text
    path = response.json()
    assert isinstance(path, str)
    return path


@asynccontextmanager
async def connect_socket(path: str, session_id: str) -> AsyncIterator[Channel]:
    """A channel client on a per-session socket: HTTP upgrade with the bearer token."""
    transport = httpx.AsyncHTTPTransport(uds=path)
    async with httpx.AsyncClient(transport=transport, headers=AUTH) as http:
        async with aconnect_ws(f"http://localhost/api/channels/{session_id}", http) as ws:
            yield Channel(ws)


async def started(daemon: RunningDaemon, session_id: str | None = None) -> str:
    fields = {} if session_id is None else {"session_id": session_id}
    session_id = await daemon.create(**fields)
    response = await daemon.start(session_id)
    assert response.status_code == 200, response.text
    return session_id


async def kernel_pid_seen_by(channel: Channel) -> int:
    msg_id = await channel.execute("import os; print(os.getpid())")
    return int(stream_text(await channel.wait_done(msg_id), msg_id))


async def round_trip(channel: Channel) -> None:
    """A kernel_info request answered: the channel reaches a live kernel."""
    request = jupyter_message("kernel_info_request", {})
    await channel.send(request)
    msg_id = request["header"]["msg_id"]
    await channel.wait_for(lambda f: f.get("kind") == "jupyter"
                           and f["header"]["msg_type"] == "kernel_info_reply"
                           and (f["parent_header"] or {}).get("msg_id") == msg_id)


# ---- 1. one path per session -------------------------------------------------------------


async def test_sessions_sharing_an_id_prefix_get_their_own_sockets(
    unix_daemon: RunningDaemon,
) -> None:
    # Positron's ids are `python-<8 hex>`: their first 8 bytes are all "python-a".
    ids = ["python-aaaaaaaa1", "python-aaaaaaaa2"]
    async with trio.open_nursery() as nursery:
        for session_id in ids:
            nursery.start_soon(started, unix_daemon, session_id)
    paths = [await channels_path(unix_daemon, session_id) for session_id in ids]
    assert paths[0] != paths[1]
    for session_id, path in zip(ids, paths, strict=True):
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert len(os.fsencode(path)) <= unix.MAX_SOCKET_PATH_BYTES
        async with connect_socket(path, session_id) as channel:
            pid = await kernel_pid_seen_by(channel)
            info = await session_json(unix_daemon, session_id)
            assert pid == info["process_id"]
            assert info["connected"] and info["socket_path"] == path
    # The other session was never connected: its socket serves only its own kernel.
    assert not (await session_json(unix_daemon, ids[0]))["connected"]


async def test_a_session_recreated_under_the_same_id_gets_a_new_socket(
    unix_daemon: RunningDaemon,
) -> None:
    session_id = await unix_daemon.create()
    first = await channels_path(unix_daemon, session_id)
    assert (await unix_daemon.client.delete(f"/sessions/{session_id}")).status_code == 200
    with trio.fail_after(10):
        while os.path.exists(first):  # the listener ends with the session
            await trio.sleep(0.02)
    await started(unix_daemon, session_id)
    second = await channels_path(unix_daemon, session_id)
    assert second != first
    async with connect_socket(second, session_id) as channel:
        await round_trip(channel)


# ---- 2. eviction happens when the new client connects, with the event ------------------------


@attrs.frozen
class Transport:
    """How a test reaches a session's channel on one transport."""

    daemon: RunningDaemon

    def open(self, session_id: str) -> AbstractAsyncContextManager[Channel]:
        if self.daemon.config.transport == "tcp":
            return open_channel(self.daemon, session_id)
        return self._open_socket(session_id)

    @asynccontextmanager
    async def _open_socket(self, session_id: str) -> AsyncIterator[Channel]:
        path = await channels_path(self.daemon, session_id)
        async with connect_socket(path, session_id) as channel:
            yield channel


@pytest.fixture(params=["tcp", "socket"])
async def transport(
    request: pytest.FixtureRequest, nursery: trio.Nursery, short_dir: Path
) -> AsyncIterator[Transport]:
    config = daemon_config(short_dir, transport=request.param)
    if request.param == "tcp":
        async for daemon in running_daemon(nursery, config):
            yield Transport(daemon)
    else:
        async with running_unix_daemon(nursery, config) as daemon:
            yield Transport(daemon)


async def test_a_connecting_client_evicts_the_previous_one_with_clientDisconnected(
    transport: Transport,
) -> None:
    daemon = transport.daemon
    session_id = await started(daemon)
    async with transport.open(session_id) as first:
        await round_trip(first)
        async with transport.open(session_id) as second:
            frames = await first.drain_until_closed()
            assert frames[-1] == EVICTED and EVICTED not in frames[:-1]
            await round_trip(second)
            assert (await session_json(daemon, session_id))["connected"] is True
    assert EVICTED not in second.frames


async def test_asking_for_the_path_again_leaves_the_connected_client_alone(
    unix_daemon: RunningDaemon,
) -> None:
    session_id = await started(unix_daemon)
    path = await channels_path(unix_daemon, session_id)
    async with connect_socket(path, session_id) as first:
        await round_trip(first)
        # A second window asks for the path: the same socket, and the first client stays.
        assert await channels_path(unix_daemon, session_id) == path
        await round_trip(first)
        info = await session_json(unix_daemon, session_id)
        assert info["connected"] and info["socket_path"] == path
        # Only its connecting evicts the first, which is told why before the close.
        async with connect_socket(path, session_id) as second:
            frames = await first.drain_until_closed()
            assert frames[-1] == EVICTED and EVICTED not in frames[:-1]
            await round_trip(second)
            info = await session_json(unix_daemon, session_id)
            assert info["connected"] and info["socket_path"] == path
    with trio.fail_after(10):
        while (await session_json(unix_daemon, session_id))["connected"]:
            await trio.sleep(0.02)
    assert "socket_path" not in await session_json(unix_daemon, session_id)


# ---- 3. the reconnect race -------------------------------------------------------------------


async def test_listener_cleanup_spares_a_socket_that_reuses_its_inode(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind the lost sockets, driven step by step.

    A listener that is being replaced finds its path already taken over: the new listener has
    unlinked the old file and bound its own. Once the old listener's socket is closed its inode
    number is free, and a file bound next at that path can get the very same (st_dev, st_ino)
    (ext4 hands the freed number straight back). A cleanup that compares identities after
    closing then takes the newcomer for its own file and unlinks it: the client's connect
    fails with ENOENT. Here the newcomer appears exactly at the close, with the old identity
    (a hard link to the old inode gives the path the same (st_dev, st_ino) a recycled number
    would), whatever the filesystem.
    """
    path = short_dir / "s.sock"
    keep = short_dir / "old-inode"
    real_aclose = trio.SocketListener.aclose
    closed = trio.Event()

    async def aclose_then_newcomer(self: trio.SocketListener) -> None:
        try:
            await real_aclose(self)  # closes the socket, then checkpoints (maybe Cancelled)
        finally:
            if not closed.is_set():
                closed.set()
                os.link(keep, path)

    monkeypatch.setattr(trio.SocketListener, "aclose", aclose_then_newcomer)

    async def idle(conn: ClientConnection) -> None:
        await conn.receive_text()

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(unix.serve_unix_socket, path, idle,
                                    authorize=lambda headers: None, handshake_timeout=5.0))
        os.link(path, keep)
        path.unlink()  # the next listener's takeover (remove_stale_socket) ...
        nursery.cancel_scope.cancel()  # ... and the old listener told to stop
    assert closed.is_set()
    assert path.exists(), "the old listener removed a socket that was not its own"


async def test_the_socket_stays_put_across_reconnects(unix_daemon: RunningDaemon) -> None:
    """Asking again never re-binds: the same file, so no window where it is missing or taken."""
    session_id = await started(unix_daemon)
    path = await channels_path(unix_daemon, session_id)
    identity = (os.lstat(path).st_dev, os.lstat(path).st_ino)
    async with trio.open_nursery() as nursery:
        answers: list[str] = []

        async def ask() -> None:
            answers.append(await channels_path(unix_daemon, session_id))

        for _ in range(5):
            nursery.start_soon(ask)
    assert answers == [path] * 5
    async with connect_socket(path, session_id) as channel:
        await round_trip(channel)
    assert await channels_path(unix_daemon, session_id) == path
    assert (os.lstat(path).st_dev, os.lstat(path).st_ino) == identity


async def test_fifty_reconnect_cycles(unix_daemon: RunningDaemon) -> None:
    session_id = await started(unix_daemon)
    for cycle in range(50):
        path = await channels_path(unix_daemon, session_id)
        if cycle % 2:
            assert await channels_path(unix_daemon, session_id) == path  # asked twice
        async with connect_socket(path, session_id) as channel:
            await round_trip(channel)


async def test_a_socket_file_removed_from_outside_is_bound_anew(
    unix_daemon: RunningDaemon,
) -> None:
    session_id = await started(unix_daemon)
    path = await channels_path(unix_daemon, session_id)
    os.unlink(path)  # e.g. a temp-dir cleaner
    fresh = await channels_path(unix_daemon, session_id)
    assert fresh != path
    async with connect_socket(fresh, session_id) as channel:
        await round_trip(channel)


# ---- errors --------------------------------------------------------------------------------


async def test_a_failed_bind_is_domain_socket_error_and_leaves_nothing_behind(
    nursery: trio.Nursery, short_dir: Path
) -> None:
    missing = short_dir / "later"
    config = daemon_config(short_dir, transport="socket", unix_socket=short_dir / "main.sock",
                           socket_dir=missing)
    async with running_unix_daemon(nursery, config) as daemon:
        session_id = await daemon.create()
        # The directory does not exist: the bind fails.
        response = await daemon.client.get(f"/sessions/{session_id}/channels")
        assert response.status_code == 400
        assert response.json()["code"] == "domain_socket_error"
        assert str(missing) in response.json()["message"]
        # Nothing is left half-made: once the directory exists the socket is bound.
        missing.mkdir()
        path = await channels_path(daemon, session_id)
        assert Path(path).parent == missing
        async with connect_socket(path, session_id) as channel:
            msg_id = await channel.execute("print('held')")  # held until the kernel is up
            assert (await daemon.start(session_id)).status_code == 200
            assert stream_text(await channel.wait_done(msg_id), msg_id) == "held\n"
    with trio.fail_after(10):
        while os.path.exists(path):  # the daemon's shutdown removes the sockets it bound
            await trio.sleep(0.02)


async def test_a_socket_dir_too_long_for_sun_path_is_socket_path_too_long(
    nursery: trio.Nursery, short_dir: Path
) -> None:
    config = daemon_config(short_dir, transport="socket", unix_socket=short_dir / "main.sock",
                           socket_dir=Path("/" + "d" * unix.MAX_SOCKET_PATH_BYTES))
    async with running_unix_daemon(nursery, config) as daemon:
        session_id = await daemon.create()
        for _ in range(2):
            response = await daemon.client.get(f"/sessions/{session_id}/channels")
            assert response.status_code == 400
            assert response.json()["code"] == "socket_path_too_long"
        assert (await daemon.client.get(f"/sessions/{session_id}")).status_code == 200
