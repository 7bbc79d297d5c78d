"""Server-wide behaviour: status, configuration, client heartbeats, idle shutdown, resources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import httpx
import trio
from httpx_ws import aconnect_ws

from kallichore_trio.app import run_daemon
from kallichore_trio.config import KALLICHORE_VERSION
from tests.helpers import (
    TOKEN,
    RunningDaemon,
    daemon_config,
)


async def test_status_reports_the_server(daemon: RunningDaemon) -> None:
    status = (await daemon.client.get("/status", headers={"Authorization": ""})).json()
    assert status["version"] == KALLICHORE_VERSION == "0.1.69"
    # No MCP server yet: the block says so (its port is null, not absent).
    assert status["mcp"] == {"active": False, "port": None, "request_count": 0, "workspaces": []}
    assert status["server_id"] == daemon.config.server_id
    assert (status["sessions"], status["active"], status["busy"]) == (0, 0, False)
    for field in ("idle_seconds", "busy_seconds", "uptime_seconds", "process_id", "started"):
        assert field in status
    assert status["started"].endswith("Z")


async def test_server_configuration_round_trip_and_validation(daemon: RunningDaemon) -> None:
    client = daemon.client
    config = (await client.get("/server_configuration")).json()
    assert "idle_shutdown_hours" not in config  # disabled: omitted, as the reference does
    assert config["resource_sample_interval_ms"] == 1000
    assert (await client.post("/server_configuration",
                              json={"idle_shutdown_hours": 4})).json() is None
    assert (await client.post("/server_configuration",
                              json={"resource_sample_interval_ms": 50})).status_code == 200
    config = (await client.get("/server_configuration")).json()
    assert (config["idle_shutdown_hours"], config["resource_sample_interval_ms"]) == (4, 100)
    await client.post("/server_configuration", json={"idle_shutdown_hours": -1})
    assert "idle_shutdown_hours" not in (await client.get("/server_configuration")).json()
    bad = await client.post("/server_configuration", json={"resource_sample_interval_ms": -5})
    assert bad.status_code == 400 and bad.json()["code"] == "400"
    bad = await client.post("/server_configuration", json={"idle_shutdown_hours": 70000})
    assert bad.json() == {"code": "400", "message": "idle_shutdown_hours is too large"}
    assert config["resource_include_children"] is True
    await client.post("/server_configuration", json={"resource_include_children": False})
    assert (await client.get("/server_configuration")).json()["resource_include_children"] is False
    bad = await client.post("/server_configuration", json={"resource_include_children": "no"})
    assert bad.status_code == 400


async def test_client_heartbeat_accepts_a_pid_and_rejects_a_bad_body(
    daemon: RunningDaemon,
) -> None:
    ok = await daemon.client.post("/client_heartbeat", json={"process_id": 1})
    assert ok.status_code == 200 and ok.json() is None
    missing = await daemon.client.post("/client_heartbeat", content=b"")
    assert missing.status_code == 400
    assert missing.text == "Missing required body parameter ClientHeartbeat"


async def test_idle_shutdown_stops_an_idle_daemon(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, idle_shutdown_hours=0)
    config = attrs.evolve(config, timeouts=attrs.evolve(config.timeouts, idle_zero_hours=1.0))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_daemon, config)
        # run_daemon returned by itself: the daemon shut down after being idle.


async def test_a_live_heartbeat_pid_keeps_the_daemon_up(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, idle_shutdown_hours=0)
    config = attrs.evolve(config, timeouts=attrs.evolve(config.timeouts, idle_zero_hours=0.5))
    client_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(run_daemon, config)
            async with httpx.AsyncClient(base_url=address.base_path,
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                response = await client.post("/client_heartbeat",
                                             json={"process_id": client_process.pid})
                assert response.status_code == 200
                await trio.sleep(2.0)  # four idle periods pass while the client lives
                assert (await client.get("/status")).status_code == 200
                client_process.kill()
                client_process.wait()
            with trio.fail_after(10):
                # With the client gone, the next idle period ends the daemon.
                while True:
                    try:
                        async with httpx.AsyncClient(base_url=address.base_path) as c:
                            await c.get("/status")
                    except httpx.HTTPError:
                        break
                    await trio.sleep(0.2)
    finally:
        client_process.kill()
        client_process.wait()


async def test_resource_usage_is_sampled_while_a_client_is_connected(
    daemon: RunningDaemon,
) -> None:
    session_id = await daemon.create()
    assert (await daemon.start(session_id)).status_code == 200
    await daemon.client.post("/server_configuration", json={"resource_sample_interval_ms": 200})
    async with aconnect_ws(f"{daemon.ws_base}/sessions/{session_id}/channels",
                           daemon.client) as ws:
        with trio.fail_after(10):
            while True:
                frame = json.loads(await ws.receive_text())
                if frame.get("resourceUsage"):
                    usage = frame["resourceUsage"]
                    break
        assert usage["memory_bytes"] > 0 and usage["thread_count"] >= 1
        assert usage["sampling_period_ms"] == 200 and usage["timestamp"] > 0
        shown = (await daemon.client.get(f"/sessions/{session_id}")).json()["resource_usage"]
        assert shown["memory_bytes"] > 0
