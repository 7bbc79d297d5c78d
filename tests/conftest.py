"""The `daemon` fixture: a real daemon in the test's nursery (tests/helpers.py has the rest)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tests.helpers import RunningDaemon, daemon_config, running_daemon


@pytest.fixture(autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """kcserver's default --state-dir is under XDG_STATE_HOME: a daemon a test starts (in
    process or not) must neither write to the user's nor take over the sessions kept there."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


@pytest.fixture
async def daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    config = daemon_config(tmp_path)
    async for running in running_daemon(nursery, config):
        yield running


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path must fit in sun_path (104 bytes on
    macOS, 108 on Linux), and pytest's tmp_path may not leave room for one."""
    d = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def kernel_pids() -> Iterator[set[int]]:
    """Kernel pids a test saw: killed at the end, so that a failure leaves no kernel behind
    (a kernel outlives a SIGKILLed daemon by design, docs/durability.md)."""
    pids: set[int] = set()
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
