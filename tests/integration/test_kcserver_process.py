"""The real `kcserver` console script, launched the ways Positron and `make run` launch it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest
import trio
from httpx_ws import aconnect_ws

from tests.helpers import (
    EXIT_TIMEOUT,
    KCSERVER,
    STARTUP_TIMEOUT,
    Server,
    execute_request,
    is_idle_for,
    launch,
    new_session_body,
    stop,
)

pytestmark = pytest.mark.skipif(
    not KCSERVER.exists(), reason="kcserver is not installed: pip install -e '.[test]'"
)


async def check_status(server: Server) -> None:
    async with server.client() as client:
        response = await client.get("/status")
    assert response.status_code == 200
    status = response.json()
    assert status["server_id"] == server.doc["server_id"]
    assert status["process_id"] == server.process.pid == server.doc["server_pid"]


MODES = {
    "tcp-connection-file-no-token": ["--transport", "tcp", "--token", "none"],
    "socket-connection-file": [],
}


@pytest.mark.parametrize("how", ["sigterm", "shutdown"])
@pytest.mark.parametrize("mode", list(MODES))
async def test_connection_file_modes(mode: str, how: str, short_dir: Path) -> None:
    conn_file = short_dir / "kallichore-1.json"
    log_file = short_dir / "kallichore-1.log"
    args = ["--connection-file", str(conn_file), "--log-file", str(log_file),
            "--log-level", "debug", *MODES[mode]]
    async with launch(args, short_dir) as server:
        doc = server.doc
        assert doc["server_pid"] == server.process.pid
        assert doc["log_path"] == str(log_file)
        assert (conn_file.stat().st_mode & 0o777) == 0o600
        if mode.startswith("tcp"):
            assert doc["transport"] == "tcp" and doc["bearer_token"] is None
            assert doc["base_path"] == f"http://127.0.0.1:{doc['port']}"
            assert "socket_path" not in doc
            main_socket = None
        else:
            assert doc["transport"] == "socket" and "port" not in doc
            assert re.fullmatch(r"[0-9a-f]{16}", doc["bearer_token"])
            main_socket = Path(doc["socket_path"])
            assert main_socket.parent == short_dir  # generated in $XDG_RUNTIME_DIR
        await check_status(server)
        await stop(server, how)
        if main_socket is not None:
            assert not main_socket.exists()
        token = doc["bearer_token"]
        if token:
            assert token not in server.output()
            assert token not in log_file.read_text()
        assert "Listening" in server.out.read_text()


@pytest.mark.parametrize("how", ["sigterm", "shutdown"])
async def test_handshake_socket(how: str, short_dir: Path) -> None:
    handshake = short_dir / "hs.sock"
    args = ["--handshake-socket", str(handshake), "--log-level", "debug"]
    async with launch(args, short_dir, handshake=handshake) as server:
        doc = server.doc
        assert doc["transport"] == "socket" and "log_path" not in doc
        assert set(doc) == {"socket_path", "transport", "server_path", "server_pid",
                            "bearer_token", "server_id"}
        main_socket = Path(doc["socket_path"])
        assert (main_socket.stat().st_mode & 0o777) == 0o600
        await check_status(server)
        # An authenticated call with a wrong token is refused: the token is real.
        async with server.client() as client:
            client.headers["Authorization"] = "Bearer wrong"
            assert (await client.post("/shutdown")).status_code == 401
        await stop(server, how)
        assert not main_socket.exists()
        assert doc["bearer_token"] not in server.output()


async def test_handshake_failure_exits_nonzero(short_dir: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(short_dir))
    with trio.fail_after(STARTUP_TIMEOUT):
        result = await trio.run_process(
            [str(KCSERVER), "--handshake-socket", str(short_dir / "nobody.sock")],
            env=env, capture_stdout=True, capture_stderr=True, check=False,
        )
    assert result.returncode != 0
    assert b"handshake socket" in result.stderr
    assert not list(short_dir.glob("kc-*.sock"))


async def test_make_run_prints_a_working_curl(short_dir: Path) -> None:
    out = short_dir / "stdout.txt"
    with out.open("wb") as fout:
        process = await trio.lowlevel.open_process(
            [str(KCSERVER), "--transport", "tcp"], stdout=fout, stderr=subprocess.STDOUT,
            cwd=short_dir,
        )
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            while "Try: " not in (text := out.read_text()):
                assert process.poll() is None, text
                await trio.sleep(0.05)
        assert re.search(r"^Listening at 127\.0\.0\.1:\d+$", text, re.M)
        token = re.search(r"^Token: ([0-9a-f]{16})$", text, re.M)
        assert token, text
        curl = re.search(r"^Try: (curl .*)$", text, re.M)
        assert curl and token.group(1) in curl.group(1)
        if shutil.which("curl"):
            result = await trio.run_process(
                [*shlex.split(curl.group(1)), "-sS", "-f"], capture_stdout=True, check=False
            )
            assert result.returncode == 0
            assert json.loads(result.stdout)["sessions"] == []
        process.send_signal(signal.SIGINT)
        with trio.fail_after(EXIT_TIMEOUT):
            assert await process.wait() == 0
        assert text.count(token.group(1)) == 2  # the Token line and the curl line, nowhere else
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def test_kernel_through_the_process_over_socket_transport(short_dir: Path) -> None:
    """Positron's Gen 2 launch: connection file, socket transport, channels on a per-session
    socket reached as ws+unix://<path>:/api/channels/<id>."""
    conn_file = short_dir / "kallichore-k.json"
    args = ["--connection-file", str(conn_file), "--transport", "socket",
            "--log-level", "debug", "--log-file", str(short_dir / "k.log")]
    async with launch(args, short_dir) as server:
        session_id = "python-proc1"
        async with server.client() as client:
            client.timeout = httpx.Timeout(60)
            created = await client.put("/sessions", json=new_session_body(session_id))
            assert created.status_code == 200, created.text
            started = await client.post(f"/sessions/{session_id}/start")
            assert started.json()["status"] == "ok", started.text
            kernel_pid = (await client.get(f"/sessions/{session_id}")).json()["process_id"]
            channel_path = Path((await client.get(f"/sessions/{session_id}/channels")).json())
            assert channel_path.parent == short_dir
            assert (channel_path.stat().st_mode & 0o777) == 0o600

            transport = httpx.AsyncHTTPTransport(uds=str(channel_path))
            auth = {"Authorization": f"Bearer {server.doc['bearer_token']}"}
            async with httpx.AsyncClient(transport=transport, headers=auth) as ws_http:
                url = f"http://localhost/api/channels/{session_id}"
                async with aconnect_ws(url, ws_http) as ws:
                    msg_id = "m-1"
                    await ws.send_text(json.dumps(execute_request("print(6 * 7)", msg_id)))
                    out = ""
                    with trio.fail_after(30):
                        while True:
                            frame = json.loads(await ws.receive_text())
                            # stdout only: ipykernel may warn on stderr (frozen modules).
                            if (frame.get("kind") == "jupyter"
                                    and frame["header"]["msg_type"] == "stream"
                                    and frame["content"]["name"] == "stdout"):
                                out += frame["content"]["text"]
                            if is_idle_for(frame, msg_id):
                                break
                    assert out == "42\n"
        await stop(server, "sigterm")
        # A deliberate shutdown leaves nothing behind: kernel, main and session sockets.
        assert not psutil.pid_exists(kernel_pid) or (
            psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert not Path(server.doc["socket_path"]).exists()
        assert not channel_path.exists()
