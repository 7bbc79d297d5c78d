"""JEP 66: kernels with protocol_version >= 5.5 report their own ports on a registration socket."""

from __future__ import annotations

import json
import sys

import trio
from httpx_ws import aconnect_ws

from tests.helpers import (
    KERNELS,
    RunningDaemon,
)


async def test_a_jep66_kernel_registers_its_ports_and_starts(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(
        [sys.executable, str(KERNELS / "jep66_kernel.py"), "{connection_file}"],
        protocol_version="5.5",
    )
    async with aconnect_ws(f"{daemon.ws_base}/sessions/{session_id}/channels",
                           daemon.client) as ws:
        response = await daemon.start(session_id)
        assert response.status_code == 200, response.text
        assert response.json()["implementation"] == "jep66"
        frames = []
        with trio.fail_after(10):
            while not any("handshakeCompleted" in f for f in frames):
                frames.append(json.loads(await ws.receive_text()))
    event = next(f for f in frames if "handshakeCompleted" in f)["handshakeCompleted"]
    assert event[0] == session_id
    info = (await daemon.client.get(f"/sessions/{session_id}/connection_info")).json()
    assert event[1] == info
    assert {"shell_port", "iopub_port", "hb_port", "control_port", "stdin_port"} <= set(info)
    assert info["signature_scheme"] == "hmac-sha256" and info["ip"] == "127.0.0.1"
    status = (await daemon.client.get(f"/sessions/{session_id}")).json()["status"]
    assert status == "idle"


async def test_a_kernel_that_never_registers_fails_with_ks17(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(
        [sys.executable, "-c", "import time; time.sleep(60)", "{connection_file}"],
        protocol_version="5.5", connection_timeout=1,
    )
    response = await daemon.start(session_id)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "KS-17"
    assert "Timeout waiting for handshake" in response.json()["error"]["message"]
