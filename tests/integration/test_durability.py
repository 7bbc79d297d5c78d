"""Kernels survive a daemon crash, and a new daemon on the same --state-dir re-attaches them.

Real `kcserver` processes (SIGKILLed, as the OOM killer would), real ipykernel kernels. Every
kernel a test sees is killed by pid at the end, whatever happened (docs/durability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from httpx_ws import aconnect_ws

from kallichore_trio.kernel.output import OUTPUT_FILE_BOUND
from tests.helpers import (
    KCSERVER,
    STARTUP_TIMEOUT,
    Server,
    execute_request,
    is_idle_for,
    is_reply_to,
    kernel_event,
    launch_on_state_dir,
    mini_argv,
    new_session_body,
    process_gone,
    stop,
    wait_process_gone,
)

pytestmark = pytest.mark.skipif(
    not KCSERVER.exists(), reason="kcserver is not installed: pip install -e '.[test]'"
)


async def crash(server: Server) -> None:
    server.process.send_signal(signal.SIGKILL)
    with trio.fail_after(STARTUP_TIMEOUT):
        await server.process.wait()


async def create_started(server: Server, session_id: str, pids: set[int],
                         **fields: Any) -> int:
    async with server.client() as client:
        client.timeout = httpx.Timeout(60)
        created = await client.put("/sessions", json=new_session_body(session_id, **fields))
        assert created.status_code == 200, created.text
        started = await client.post(f"/sessions/{session_id}/start")
        assert started.status_code == 200 and started.json()["status"] == "ok", started.text
        pid = (await client.get(f"/sessions/{session_id}")).json()["process_id"]
    assert isinstance(pid, int)
    pids.add(pid)
    return pid


async def sessions(server: Server) -> dict[str, dict[str, Any]]:
    async with server.client() as client:
        response = await client.get("/sessions")
    assert response.status_code == 200, response.text
    return {s["session_id"]: s for s in response.json()["sessions"]}


async def wait_status(server: Server, session_id: str, status: str) -> dict[str, Any]:
    with trio.fail_after(30):
        while (session := (await sessions(server))[session_id])["status"] != status:
            await trio.sleep(0.05)
    return session


async def run(ws: Any, code: str, *, on_sent: Any = None) -> tuple[str, list[dict[str, Any]]]:
    """Execute `code`; its stdout and every frame up to its reply and idle status (which
    come on different channels, in either order)."""
    msg_id = os.urandom(8).hex()
    await ws.send_text(json.dumps(execute_request(code, msg_id)))
    if on_sent is not None:
        await on_sent()
    out, frames = "", []
    idle = replied = False
    with trio.fail_after(60):
        while not (idle and replied):
            frame = json.loads(await ws.receive_text())
            frames.append(frame)
            if (frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "stream"
                    and frame["content"]["name"] == "stdout"):
                out += frame["content"]["text"]
            idle = idle or is_idle_for(frame, msg_id)
            replied = replied or is_reply_to(frame, msg_id, "execute_reply")
    return out, frames


@contextlib.asynccontextmanager
async def channel(server: Server, session_id: str) -> AsyncIterator[Any]:
    """The session's WebSocket: on the TCP API, or on its own Unix socket (socket transport)."""
    if "base_path" in server.doc:
        url = f"{server.doc['base_path'].replace('http', 'ws', 1)}/sessions/{session_id}/channels"
        async with server.client() as http, aconnect_ws(url, http) as ws:
            yield ws
        return
    async with server.client() as http:
        path = (await http.get(f"/sessions/{session_id}/channels")).json()
    auth = {"Authorization": f"Bearer {server.doc['bearer_token']}"}
    transport = httpx.AsyncHTTPTransport(uds=path)
    async with httpx.AsyncClient(transport=transport, headers=auth) as http:
        async with aconnect_ws(f"http://localhost/api/channels/{session_id}", http) as ws:
            yield ws


def records(short_dir: Path) -> list[str]:
    return sorted(p.name for p in (short_dir / "state").iterdir())


@pytest.mark.parametrize("transport", ["tcp", "socket"])
async def test_kernels_survive_a_crash_and_are_reattached(short_dir: Path, kernel_pids: set[int],
                                                          transport: str) -> None:
    async with launch_on_state_dir(short_dir, "a", transport) as first:
        pid1 = await create_started(first, "py-1", kernel_pids, interrupt_mode="signal")
        pid2 = await create_started(first, "py-2", kernel_pids)
        async with channel(first, "py-1") as ws:
            await run(ws, "x = 42")
        assert len([r for r in records(short_dir) if r.endswith(".json")]) == 2
        await crash(first)
    assert not process_gone(pid1) and not process_gone(pid2)

    async with launch_on_state_dir(short_dir, "b", transport) as second:
        listed = await sessions(second)
        assert set(listed) == {"py-1", "py-2"}
        for sid, pid in (("py-1", pid1), ("py-2", pid2)):
            session = await wait_status(second, sid, "idle")
            assert session["process_id"] == pid
            assert session["display_name"] == "Test Python Kernel"
        assert listed["py-1"]["interrupt_mode"] == "signal"

        async with second.client() as http:
            http.timeout = httpx.Timeout(60)
            async with channel(second, "py-1") as ws:
                first_frame = json.loads(await ws.receive_text())
                restarted = first_frame.get("supervisorRestarted")
                assert first_frame["kind"] == "kernel" and restarted, first_frame
                assert restarted["previous_server_id"] == first.doc["server_id"]
                assert restarted["gap_ms"] >= 0
                out, _ = await run(ws, "print(x)")
                assert out == "42\n"
                out, _ = await run(ws, "import os; print(os.environ.get('JPY_PARENT_PID'))")
                assert out == "None\n"

                # Kernel output outside iopub (the process's own stdout) still arrives.
                _, frames = await run(ws, "import os; os.write(1, b'straight out\\n')")
                if not any(f.get("output") == ["stdout", "straight out\n"] for f in frames):
                    with trio.fail_after(10):
                        while json.loads(await ws.receive_text()).get("output") != [
                                "stdout", "straight out\n"]:
                            pass

                # Interrupt (signal mode) reaches the re-attached kernel's process group.
                async def interrupt() -> None:
                    await trio.sleep(0.5)  # let the cell start sleeping (no assertion on it)
                    response = await http.post("/sessions/py-1/interrupt")
                    assert response.status_code == 200, response.text

                _, frames = await run(ws, "import time; time.sleep(60)", on_sent=interrupt)
                replies = [f for f in frames if f.get("kind") == "jupyter"
                           and f["header"]["msg_type"] == "execute_reply"]
                assert replies and replies[0]["content"]["status"] == "error"
                assert replies[0]["content"]["ename"] == "KeyboardInterrupt"

            # Interrupt (message mode): an interrupt_request on the re-attached control socket.
            async with channel(second, "py-2") as ws:
                async def interrupt_by_message() -> None:
                    await trio.sleep(0.5)
                    response = await http.post("/sessions/py-2/interrupt")
                    assert response.status_code == 200, response.text

                _, frames = await run(ws, "import time; time.sleep(60)",
                                      on_sent=interrupt_by_message)
                replies = [f for f in frames if f.get("kind") == "jupyter"
                           and f["header"]["msg_type"] == "execute_reply"]
                assert replies and replies[0]["content"]["ename"] == "KeyboardInterrupt"

            # Restart: the old process ends, a new one runs the same session.
            response = await http.post("/sessions/py-2/restart", json={})
            assert response.status_code == 200, response.text
            await wait_process_gone(pid2)
            session = await wait_status(second, "py-2", "idle")
            assert session["process_id"] not in (None, pid2)
            kernel_pids.add(session["process_id"])

            # Kill: the re-attached kernel dies and the session says so.
            response = await http.post("/sessions/py-1/kill")
            assert response.status_code == 200, response.text
            await wait_process_gone(pid1)
            await wait_status(second, "py-1", "exited")

        new_pid = session["process_id"]
        await stop(second, "sigterm")
    assert process_gone(new_pid)
    assert records(short_dir) == []


async def test_a_kernel_busy_with_a_cell_is_reattached_busy(short_dir: Path,
                                                           kernel_pids: set[int]) -> None:
    """The status of a re-attached kernel is what the kernel is doing: `busy` while a cell the
    dead daemon sent still runs, `idle` when it ends (its idle status has a parent the new
    daemon never saw), and `idle` at once for a kernel that runs nothing."""
    release = short_dir / "release"
    cell = os.urandom(8).hex()
    # The cell runs until the test lets it end (bounded, so no kernel is left waiting).
    code = (f"import os, time\nx = 7\nfor _ in range(2400):\n"
            f"    if os.path.exists({str(release)!r}): break\n    time.sleep(0.05)\n"
            f"print('cell over')")
    async with launch_on_state_dir(short_dir, "a") as first:
        await create_started(first, "py-busy", kernel_pids)
        await create_started(first, "py-idle", kernel_pids)
        async with channel(first, "py-busy") as ws:
            await ws.send_text(json.dumps(execute_request(code, cell)))
            with trio.fail_after(30):
                while not (is_reply_to(frame := json.loads(await ws.receive_text()), cell,
                                       "status")
                           and frame["content"]["execution_state"] == "busy"):
                    pass
        await crash(first)

    async with launch_on_state_dir(short_dir, "b") as second:
        await wait_status(second, "py-busy", "busy")
        # A kernel running nothing does not wait for anything: idle while the other one's
        # cell still runs.
        await wait_status(second, "py-idle", "idle")
        assert (await sessions(second))["py-busy"]["status"] == "busy"
        async with channel(second, "py-busy") as ws:
            statuses: list[str] = []
            frames: list[dict[str, Any]] = []
            release.write_text("")
            with trio.fail_after(60):
                while not any(is_idle_for(f, cell) for f in frames):
                    frames.append(frame := json.loads(await ws.receive_text()))
                    if (event := kernel_event(frame, "status")) is not None:
                        statuses.append(event["status"])
            # Never idle before the cell the dead daemon sent was over.
            assert statuses == ["starting", "busy", "idle"], statuses
            assert any(f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream"
                       and f["content"]["text"] == "cell over\n" for f in frames)
            await wait_status(second, "py-busy", "idle")
            out, _ = await run(ws, "print(x)")
            assert out == "7\n"
        await stop(second, "sigterm")
    assert records(short_dir) == []


async def test_a_kernel_flooding_its_own_stdout_keeps_its_file_small(
        short_dir: Path, kernel_pids: set[int]) -> None:
    """Output a kernel writes to its own stdout (not iopub) goes through a file in the state
    directory; the daemon gives back what it has read (kernel/output.py), so the file stays
    under OUTPUT_FILE_BOUND while every line still arrives, in order, as an `output` event."""
    lines = 300  # of 60,000 bytes: 18 MB, over twice the bound
    async with launch_on_state_dir(short_dir, "a") as server:
        await create_started(server, "mini-flood", kernel_pids, argv=mini_argv("flood_stdout"))
        (stdout_file,) = (short_dir / "state").glob("*.stdout")
        async with channel(server, "mini-flood") as ws:
            await ws.send_text(json.dumps(execute_request(str(lines))))
            seen: list[int] = []
            with trio.fail_after(120):
                while len(seen) < lines:
                    event = kernel_event(json.loads(await ws.receive_text()), "output")
                    if event is not None and event[0] == "stdout" and event[1][0].isdigit():
                        number, _, rest = event[1].partition(" ")
                        assert len(rest) == 60_000 - len(number) - 1
                        seen.append(int(number))
            assert seen == list(range(lines))
        kept = stdout_file.stat()
        # Disk use, whichever way the filesystem lets the daemon give output back (output.py).
        assert kept.st_blocks * 512 < OUTPUT_FILE_BOUND + 1024 * 1024, kept
        await stop(server, "sigterm")
    assert records(short_dir) == []


async def test_a_kernel_that_died_unsupervised_is_exited(short_dir: Path,
                                                         kernel_pids: set[int]) -> None:
    async with launch_on_state_dir(short_dir, "a") as first:
        pid = await create_started(first, "py-dead", kernel_pids)
        await crash(first)
    os.killpg(pid, signal.SIGKILL)
    await wait_process_gone(pid)
    # A record that is not one is moved aside, and does not stop the daemon.
    (short_dir / "state" / "junk.json").write_text("{ not a record")
    async with launch_on_state_dir(short_dir, "b") as second:
        assert (short_dir / "state" / "junk.json.bad").exists()
        session = await wait_status(second, "py-dead", "exited")
        assert session.get("process_id") is None
        async with second.client() as http:
            http.timeout = httpx.Timeout(60)
            # Restartable ...
            response = await http.post("/sessions/py-dead/restart", json={})
            assert response.status_code == 200, response.text
            session = await wait_status(second, "py-dead", "idle")
            kernel_pids.add(session["process_id"])
            await http.post("/sessions/py-dead/kill")
            await wait_status(second, "py-dead", "exited")
            # ... and deletable, which removes its record.
            response = await http.delete("/sessions/py-dead")
            assert response.status_code == 200, response.text
        assert records(short_dir) == ["junk.json.bad"]
        await stop(second, "shutdown")


async def test_a_live_daemon_keeps_its_sessions(short_dir: Path, kernel_pids: set[int]) -> None:
    async with launch_on_state_dir(short_dir, "a") as first:
        pid = await create_started(first, "py-live", kernel_pids)
        async with launch_on_state_dir(short_dir, "b") as second:
            assert await sessions(second) == {}
            await stop(second, "sigterm")
        session = await wait_status(first, "py-live", "idle")
        assert session["process_id"] == pid
        await stop(first, "sigterm")
    assert process_gone(pid)
    assert records(short_dir) == []


async def test_an_unusable_state_dir_stops_the_start(short_dir: Path) -> None:
    blocker = short_dir / "not-a-dir"
    blocker.write_text("")
    with trio.fail_after(STARTUP_TIMEOUT):
        result = await trio.run_process(
            [str(KCSERVER), "--transport", "tcp", "--state-dir", str(blocker / "state")],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode != 0
    assert str(blocker / "state").encode() in result.stderr


async def test_two_daemons_starting_at_once_split_the_orphans(short_dir: Path,
                                                              kernel_pids: set[int]) -> None:
    ids = [f"py-{i}" for i in range(4)]
    async with launch_on_state_dir(short_dir, "a") as first:
        pids = {sid: await create_started(first, sid, kernel_pids) for sid in ids}
        await crash(first)
    # Both processes are started at the same moment and scan the state dir concurrently.
    servers: dict[str, Server] = {}
    both_up, checked = trio.Event(), trio.Event()

    async def run_daemon(name: str) -> None:
        async with launch_on_state_dir(short_dir, name) as server:
            servers[name] = server
            if len(servers) == 2:
                both_up.set()
            await checked.wait()
            await stop(server, "sigterm")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_daemon, "b")
        nursery.start_soon(run_daemon, "c")
        with trio.fail_after(STARTUP_TIMEOUT * 2):
            await both_up.wait()
        taken = {name: await sessions(server) for name, server in servers.items()}
        assert not set(taken["b"]) & set(taken["c"])
        assert set(taken["b"]) | set(taken["c"]) == set(ids)
        for name, server in servers.items():
            for sid in taken[name]:
                session = await wait_status(server, sid, "idle")
                assert session["process_id"] == pids[sid]
        checked.set()
    for pid in pids.values():
        assert process_gone(pid)
    assert records(short_dir) == []
