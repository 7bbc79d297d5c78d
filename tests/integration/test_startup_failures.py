"""Kernels that do not come up: each failure is a 500 startupError, and the daemon carries on."""

from __future__ import annotations

import re
from pathlib import Path

import trio

from tests.helpers import (
    RunningDaemon,
    mini_argv,
    session_json,
    wait_process_gone,
)


async def test_startup_failure_exit_at_once_returns_500_with_output_and_exit_code(
    daemon: RunningDaemon,
) -> None:
    session_id = await daemon.create(mini_argv("exit_at_once"))
    response = await daemon.start(session_id)
    assert response.status_code == 500
    body = response.json()
    assert body["exit_code"] == 3
    assert "mini kernel: failing on purpose" in body["output"]
    assert re.search(r"mini kernel pid \d+", body["output"])
    assert body["error"]["code"] == "KS-8"
    assert body["error"]["message"] == "The process exited abnormally (exit status: 3)"
    assert body["error"]["details"] == "Kernel failed to start"
    info = await session_json(daemon, session_id)
    assert info["status"] == "exited" and "process_id" not in info


async def test_startup_failure_never_answers_times_out(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(mini_argv("never_answers"), connection_timeout=2)
    with trio.fail_after(30):
        response = await daemon.start(session_id)
    assert response.status_code == 500
    body = response.json()
    assert body["exit_code"] == 130
    assert body["error"]["code"] == "KS-7"
    assert body["error"]["message"] == (
        "Timed out waiting to connect to session's ZeroMQ sockets after 2 seconds")
    match = re.search(r"mini kernel pid (\d+)", body["output"])
    assert match, body["output"]
    # We do better than the reference: the kernel that never answered is not left running.
    await wait_process_gone(int(match.group(1)))
    info = await session_json(daemon, session_id)
    assert info["status"] == "exited" and "process_id" not in info


async def test_startup_failure_empty_argv_is_ks5_no_arguments(daemon: RunningDaemon) -> None:
    session_id = await daemon.create([])
    response = await daemon.start(session_id)
    assert response.status_code == 500
    assert response.json() == {"error": {
        "code": "KS-5", "message": "Failed to start process for session: No arguments provided"}}


async def test_daemon_healthy_after_each_startup_failure(
    daemon: RunningDaemon, tmp_path: Path,
) -> None:
    # A program that exists but cannot be executed: the spawn itself fails (KS-5).
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    failing = [
        await daemon.create(mini_argv("exit_at_once")),
        await daemon.create(mini_argv("never_answers"), connection_timeout=1),
        await daemon.create([str(not_executable), "{connection_file}"]),
    ]
    for session_id in failing:
        assert (await daemon.start(session_id)).status_code == 500
        status = await daemon.client.get("/status")
        assert status.status_code == 200 and status.json()["busy"] is False
    # A good kernel starts and the failed sessions can be retried and deleted.
    good = await daemon.create(mini_argv("normal"))
    response = await daemon.start(good)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert (await daemon.start(failing[0])).status_code == 500
    for session_id in failing:
        assert (await daemon.client.delete(f"/sessions/{session_id}")).status_code == 200
    listed = (await daemon.client.get("/sessions")).json()
    assert [s["session_id"] for s in listed["sessions"]] == [good]
    assert listed["sessions"][0]["status"] == "idle"
