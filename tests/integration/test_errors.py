"""Error answers of the HTTP API (docs/protocol.md §3.1 and the §3.2 table)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.helpers import (
    RunningDaemon,
    is_status,
    kernel_event,
    mini_argv,
    new_session_body,
    open_channel,
    process_gone,
    session_json,
    wait_status,
)

SESSION_ROUTES = [
    ("GET", "/sessions/{id}"),
    ("DELETE", "/sessions/{id}"),
    ("POST", "/sessions/{id}/start"),
    ("POST", "/sessions/{id}/restart"),
    ("POST", "/sessions/{id}/kill"),
    ("POST", "/sessions/{id}/interrupt"),
    ("GET", "/sessions/{id}/connection_info"),
]


def assert_empty(response: httpx.Response, status: int) -> None:
    assert response.status_code == status
    assert response.content == b""
    assert "content-type" not in response.headers


@pytest.mark.parametrize(("method", "path"), SESSION_ROUTES)
async def test_unknown_session_is_404_with_an_empty_body(
    daemon: RunningDaemon, method: str, path: str
) -> None:
    response = await daemon.client.request(method, path.format(id="no-such-session"))
    assert_empty(response, 404)


async def test_channels_upgrade_for_an_unknown_session_is_400_ks1(daemon: RunningDaemon) -> None:
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    response = await daemon.client.get("/sessions/no-such-session/channels", headers=headers)
    assert response.status_code == 400
    assert response.json() == {
        "code": "KS-1",
        "message": "Session no-such-session not found",
        "details": "Establishing a websocket connection requires a valid session ID",
    }


async def test_bytes_after_a_refused_upgrade_leave_the_daemon_serving(
    daemon: RunningDaemon,
) -> None:
    # Hypercorn, left alone, answers such bytes with a second response, which h11 refuses with
    # an exception that used to end the whole server.
    request = (b"GET /sessions/no-such-session/channels HTTP/1.1\r\nHost: localhost\r\n"
               b"Authorization: Bearer " + daemon.config.token.encode() + b"\r\n"
               b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.address.port)
    async with stream:
        await stream.send_all(request)
        head = b""
        with trio.fail_after(10):
            while b"KS-1" not in head:
                head += await stream.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 400")
        await stream.send_all(b"\x81\x85" + bytes(4) + b"hello")  # a masked text frame
        await stream.send_all(b"more bytes that are not HTTP")
        await trio.sleep(0.1)
    response = await daemon.client.get("/status")
    assert response.status_code == 200


async def test_requests_without_the_token_are_401_with_an_empty_body(
    daemon: RunningDaemon,
) -> None:
    session_id = await daemon.create(mini_argv("normal"))
    async with httpx.AsyncClient(base_url=daemon.base) as anonymous:
        for method, path in SESSION_ROUTES[1:]:
            assert_empty(await anonymous.request(method, path.format(id=session_id)), 401)
        response = await anonymous.put("/sessions", json=new_session_body("x"))
        assert_empty(response, 401)
        wrong = {"Authorization": "Bearer not-the-token"}
        assert_empty(await anonymous.post(f"/sessions/{session_id}/start", headers=wrong), 401)
        # Reads need the token too (the reference leaves them open; docs/security.md).
        assert_empty(await anonymous.get(f"/sessions/{session_id}"), 401)
        assert_empty(await anonymous.get("/sessions"), 401)
    assert (await daemon.client.get(f"/sessions/{session_id}")).json()["status"] == "idle"


async def test_unknown_path_is_404_and_wrong_method_is_405_with_empty_bodies(
    daemon: RunningDaemon,
) -> None:
    assert_empty(await daemon.client.get("/no/such/path"), 404)
    assert_empty(await daemon.client.post("/sessions"), 405)
    assert_empty(await daemon.client.delete("/status"), 405)


async def test_malformed_json_and_missing_fields_are_text_400(daemon: RunningDaemon) -> None:
    response = await daemon.client.put("/sessions", content=b"{not json")
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith(
        "Couldn't parse body parameter NewSession - doesn't match schema")
    body = new_session_body("missing-fields")
    del body["argv"]
    response = await daemon.client.put("/sessions", json=body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert "doesn't match schema" in response.text and "argv" in response.text
    response = await daemon.client.put("/sessions", content=b"")
    assert response.status_code == 400
    assert response.text == "Missing required body parameter NewSession"
    assert (await daemon.client.get("/sessions")).json()["total"] == 0


async def test_duplicate_session_is_ks0(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(mini_argv("normal"))
    response = await daemon.client.put("/sessions", json=new_session_body(session_id))
    assert response.status_code == 400
    assert response.json() == {"code": "KS-0", "message": f"Session {session_id} already exists"}


async def test_missing_kernel_path_is_ks19(daemon: RunningDaemon) -> None:
    body = new_session_body("bad-path", ["/no/such/kernel", "{connection_file}"])
    response = await daemon.client.put("/sessions", json=body)
    assert response.status_code == 400
    assert response.json() == {"code": "KS-19", "message": "Kernel path not found: /no/such/kernel"}
    body = new_session_body("bad-relative", ["no-such-kernel-on-path-xyz"])
    response = await daemon.client.put("/sessions", json=body)
    assert response.status_code == 400 and response.json()["code"] == "KS-19"
    assert (await daemon.client.get("/sessions")).json()["total"] == 0


async def test_delete_of_a_running_session_is_ks2_and_kill_of_an_exited_one_is_ks3(
    daemon: RunningDaemon,
) -> None:
    session_id = await daemon.create(mini_argv("normal"))
    assert (await daemon.start(session_id)).status_code == 200
    response = await daemon.client.delete(f"/sessions/{session_id}")
    assert response.status_code == 400 and response.json()["code"] == "KS-2"
    assert (await daemon.client.post(f"/sessions/{session_id}/kill")).status_code == 200
    await wait_status(daemon, session_id, "exited")
    response = await daemon.client.post(f"/sessions/{session_id}/kill")
    assert response.status_code == 400
    assert response.json() == {"code": "KS-3", "message": f"Session {session_id} is not running"}


async def test_kill_without_a_process_is_ks12(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(mini_argv("normal"))
    response = await daemon.client.post(f"/sessions/{session_id}/kill")
    assert response.status_code == 400
    assert response.json() == {
        "code": "KS-12",
        "message": f"There is no process associated with session {session_id} (has it exited?)",
    }


async def test_signal_interrupt_without_a_process_is_ks10(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(mini_argv("normal"), interrupt_mode="signal")
    response = await daemon.client.post(f"/sessions/{session_id}/interrupt")
    assert response.status_code == 400
    assert response.json()["code"] == "KS-10"
    assert "No process ID to interrupt" in response.json()["message"]


async def test_restart_while_a_restart_is_in_progress_is_ks13(daemon: RunningDaemon) -> None:
    # An `ignore_term` kernel answers shutdown_request without exiting and ignores SIGTERM, so
    # the first restart stays in progress until the daemon escalates to SIGKILL.
    session_id = await daemon.create(mini_argv("ignore_term"))
    assert (await daemon.start(session_id)).status_code == 200
    old_pid = (await session_json(daemon, session_id))["process_id"]
    restart = f"/sessions/{session_id}/restart"
    first: dict[str, Any] = {}
    async with open_channel(daemon, session_id) as channel:

        async def first_restart() -> None:
            first["response"] = await daemon.client.post(restart, timeout=60)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_restart)
            # The relayed shutdown_reply shows the first restart has sent its shutdown_request
            # and is now waiting for a kernel that will not exit by itself.
            await channel.wait_for(lambda f: f.get("kind") == "jupyter"
                                   and f["header"]["msg_type"] == "shutdown_reply")
            second = await daemon.client.post(restart, json={}, timeout=60)
            assert "response" not in first  # the first restart was still running
            assert second.status_code == 500
            assert second.json() == {"error": {
                "code": "KS-13",
                "message": "Failed to restart kernel: Kernel is already restarting",
            }}
        # The refused restart did not disturb the one in progress.
        assert first["response"].status_code == 200, first["response"].text
        await channel.wait_for(lambda f: is_status(f, "idle", "kernel_info_reply"))
        exits = [e for f in channel.frames if (e := kernel_event(f, "exited")) is not None]
        assert exits == [-1]  # one kernel ended (by SIGKILL), not two
    info = await session_json(daemon, session_id)
    assert info["status"] == "idle" and info["process_id"] != old_pid
    assert process_gone(old_pid)
