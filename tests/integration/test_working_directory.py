"""A session whose working directory is missing still starts: in the daemon's own directory.

As the reference does, so that a user whose project folder was moved still gets a console. The
client is told (an `output` event on stderr naming the directory, kept for a client that
connects after the start), the daemon logs a warning, and the session reports the directory
actually used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.helpers import (
    Channel,
    RunningDaemon,
    is_status,
    kernel_event,
    open_channel,
    session_json,
    stream_text,
)


def names_missing_directory(frame: dict, directory: Path) -> bool:
    output = kernel_event(frame, "output")
    return bool(output) and output[0] == "stderr" and str(directory) in output[1]


async def kernel_cwd(channel: Channel) -> str:
    msg_id = await channel.execute("import os; print(os.getcwd())")
    return stream_text(await channel.wait_done(msg_id), msg_id).strip()


async def test_missing_working_directory_starts_in_the_daemons_directory_and_says_so(
    daemon: RunningDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    missing = tmp_path / "moved-project"
    session_id = await daemon.create(working_directory=str(missing))
    response = await daemon.start(session_id)
    assert response.status_code == 200, response.text
    assert (await session_json(daemon, session_id))["working_directory"] == os.getcwd()
    assert any(r.levelno == logging.WARNING and str(missing) in r.getMessage()
               for r in caplog.records)
    # The client connects after the start: the notice waited for it in the outbox.
    async with open_channel(daemon, session_id) as channel:
        await channel.wait_for(lambda f: names_missing_directory(f, missing))
        assert await kernel_cwd(channel) == os.getcwd()


async def test_restart_after_the_working_directory_was_removed(
    daemon: RunningDaemon, tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    session_id = await daemon.create(working_directory=str(project))
    assert (await daemon.start(session_id)).status_code == 200
    async with open_channel(daemon, session_id) as channel:
        assert await kernel_cwd(channel) == str(project)
        project.rmdir()
        response = await daemon.client.post(f"/sessions/{session_id}/restart", json={},
                                            timeout=60)
        assert response.status_code == 200, response.text
        await channel.wait_for(lambda f: names_missing_directory(f, project))
        await channel.wait_for(lambda f: is_status(f, "idle", "kernel_info_reply"))
        assert await kernel_cwd(channel) == os.getcwd()
    assert (await session_json(daemon, session_id))["working_directory"] == os.getcwd()
