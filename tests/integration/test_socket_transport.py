"""The socket transport: the API on a Unix socket (0600), channels on per-session sockets."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import httpx
import trio

from kallichore_trio.app import run_daemon
from tests.helpers import (
    TOKEN,
    RawWebSocket,
    daemon_config,
    execute_request,
    is_idle_for,
    new_session_body,
)


async def test_a_kernel_over_the_unix_socket_transport(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, transport="socket")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(run_daemon, config)
        socket_path = address.socket_path
        assert socket_path and stat.S_IMODE(Path(socket_path).stat().st_mode) == 0o600
        transport = httpx.AsyncHTTPTransport(uds=socket_path)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost",
            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
        ) as client:
            session_id = f"sock-{uuid.uuid4().hex[:6]}"
            assert (await client.put("/sessions", json=new_session_body(session_id))).is_success
            assert (await client.post(f"/sessions/{session_id}/start")).json()["status"] == "ok"
            unauthorized = await client.get(f"/sessions/{session_id}/channels",
                                            headers={"Authorization": ""})
            assert unauthorized.status_code == 401
            channel_path = (await client.get(f"/sessions/{session_id}/channels")).json()
            assert stat.S_IMODE(Path(channel_path).stat().st_mode) == 0o600

            ws = await RawWebSocket.connect(await trio.open_unix_socket(channel_path),
                                           f"/api/channels/{session_id}", token=TOKEN)
            msg_id = uuid.uuid4().hex
            await ws.send_text(json.dumps(execute_request("print('over a socket')", msg_id)))
            out = ""
            with trio.fail_after(30):
                while True:
                    frame = json.loads(await ws.receive_text())
                    if frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "stream":
                        out += frame["content"]["text"]
                    if is_idle_for(frame, msg_id):
                        break
            assert out == "over a socket\n"
            shown = (await client.get(f"/sessions/{session_id}")).json()
            assert shown["connected"] and shown["socket_path"] == channel_path
            await ws.stream.aclose()
            assert (await client.post("/shutdown")).json() is None
    # run_daemon has returned: the generated main socket is removed.
    assert not Path(socket_path).exists()
