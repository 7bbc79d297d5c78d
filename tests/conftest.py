"""Shared fixtures: a real daemon in the test's nursery, real HTTP and WebSocket clients."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import pytest
import trio

from kallichore_trio.app import ServerAddress, run_daemon
from kallichore_trio.config import Config, Timeouts

KERNELS = Path(__file__).parent / "kernels"
TOKEN = "test-token-0123456789"


@attrs.define
class RunningDaemon:
    address: ServerAddress
    config: Config
    client: httpx.AsyncClient

    @property
    def base(self) -> str:
        assert self.address.base_path is not None
        return self.address.base_path

    @property
    def ws_base(self) -> str:
        return self.base.replace("http://", "ws://")

    async def create(self, argv: list[str] | None = None, **fields: Any) -> str:
        session_id = fields.pop("session_id", f"test-{uuid.uuid4().hex[:8]}")
        body = new_session_body(session_id, argv, **fields)
        response = await self.client.put("/sessions", json=body)
        assert response.status_code == 200, response.text
        return session_id

    async def start(self, session_id: str) -> httpx.Response:
        return await self.client.post(f"/sessions/{session_id}/start", timeout=60)


def ipykernel_argv() -> list[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def new_session_body(session_id: str, argv: list[str] | None = None, **fields: Any) -> dict:
    body = {
        "session_id": session_id,
        "display_name": "Test Python Kernel",
        "language": "python",
        "username": "testuser",
        "input_prompt": "In [{}]: ",
        "continuation_prompt": "   ...: ",
        "argv": ipykernel_argv() if argv is None else argv,
        "session_mode": "console",
        "working_directory": str(Path.cwd()),
        "env": [
            {"action": "replace", "name": "TEST_VAR", "value": "test_value"},
            # debugpy's "frozen modules" warning otherwise lands, now and then, in the first
            # cell's captured stderr and breaks exact-output checks.
            {"action": "replace", "name": "PYDEVD_DISABLE_FILE_VALIDATION", "value": "1"},
        ],
        "connection_timeout": 20,
        "interrupt_mode": "message",
        "protocol_version": "5.3",
        "startup_environment": "none",
    }
    body.update(fields)
    return body


def daemon_config(tmp_path: Path, **overrides: Any) -> Config:
    timeouts = Timeouts(shutdown_request=3.0, terminate=2.0, kill=2.0)
    values: dict[str, Any] = {
        "token": TOKEN,
        "runtime_dir": tmp_path / "runtime",
        "socket_dir": tmp_path,
        "timeouts": timeouts,
    }
    values.update(overrides)
    return Config(**values)


@pytest.fixture
async def daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    config = daemon_config(tmp_path)
    async for running in _daemon(nursery, config):
        yield running


async def _daemon(
    nursery: trio.Nursery, config: Config, **options: Any
) -> AsyncIterator[RunningDaemon]:
    before = _kernel_pids()
    address = await nursery.start(partial(run_daemon, config, **options))
    async with httpx.AsyncClient(
        base_url=address.base_path,
        headers={"Authorization": f"Bearer {config.token}"},
        timeout=30,
    ) as client:
        yield RunningDaemon(address, config, client)
        try:
            await client.post("/shutdown")
        except httpx.HTTPError:
            pass
    # Every kernel this daemon started must be gone once it has shut down.
    with trio.fail_after(30):
        while (left := _kernel_pids() - before) and any(psutil.pid_exists(p) for p in left):
            await trio.sleep(0.1)


def _kernel_pids() -> set[int]:
    me = psutil.Process()
    return {c.pid for c in me.children(recursive=True)}
