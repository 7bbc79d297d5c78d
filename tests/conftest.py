"""The `daemon` fixture: a real daemon in the test's nursery (tests/helpers.py has the rest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.helpers import RunningDaemon, daemon_config, running_daemon


@pytest.fixture
async def daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    config = daemon_config(tmp_path)
    async for running in running_daemon(nursery, config):
        yield running
