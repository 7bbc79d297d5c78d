"""startup_environment (none/shell/command/script) and env var actions, seen from the kernel."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    KERNELS,
    RunningDaemon,
    open_channel,
    session_json,
    stream_text,
)

PRINT_VARS = "import os; print(repr([os.environ.get(n, 'NOT_SET') for n in {names!r}]))"


async def start_and_print(daemon: RunningDaemon, names: list[str], **fields: Any) -> list[str]:
    session_id = await daemon.create(connection_timeout=30, **fields)
    response = await daemon.start(session_id)
    assert response.status_code == 200, response.text
    async with open_channel(daemon, session_id) as channel:
        msg_id = await channel.execute(PRINT_VARS.format(names=names))
        frames = await channel.wait_done(msg_id)
    return ast.literal_eval(stream_text(frames, msg_id))


async def test_shell_mode_starts_the_kernel_and_keeps_session_env(daemon: RunningDaemon) -> None:
    assert await start_and_print(daemon, ["TEST_VAR"], startup_environment="shell") == [
        "test_value"]


async def test_bad_shell_env_var_does_not_break_shell_mode(daemon: RunningDaemon) -> None:
    # Row 21: the server's $SHELL is used, not a SHELL set through the session's env.
    env = [{"action": "replace", "name": "SHELL", "value": "/non/existent/shell"}]
    assert await start_and_print(daemon, ["SHELL"], startup_environment="shell", env=env) == [
        "/non/existent/shell"]


async def test_command_mode_runs_the_startup_command_before_the_kernel(
    daemon: RunningDaemon,
) -> None:
    values = await start_and_print(
        daemon, ["TEST_KALLI_VAR"], startup_environment="command",
        startup_environment_arg="export TEST_KALLI_VAR=from_command")
    assert values == ["from_command"]


async def test_script_mode_sources_the_startup_script(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    script = tmp_path / "startup.sh"
    script.write_text("#!/bin/bash\nexport TEST_KALLI_VAR=from_script\n")
    values = await start_and_print(
        daemon, ["TEST_KALLI_VAR"], startup_environment="script",
        startup_environment_arg=str(script))
    assert values == ["from_script"]


async def test_script_mode_with_a_missing_script_is_ks5(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    session_id = await daemon.create(startup_environment="script",
                                     startup_environment_arg=str(tmp_path / "missing.sh"))
    response = await daemon.start(session_id)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "KS-5" and "missing.sh" in error["message"]


async def test_command_mode_with_a_failing_command_reports_the_context(
    daemon: RunningDaemon,
) -> None:
    session_id = await daemon.create(startup_environment="command",
                                     startup_environment_arg="echo before-fail; false")
    response = await daemon.start(session_id)
    assert response.status_code == 500
    body = response.json()
    assert body["exit_code"] == 1
    assert body["error"]["code"] == "KS-8"
    details = body["error"]["details"]
    assert "Startup command: echo before-fail; false\n" in details
    assert details.endswith("Startup command failed")
    assert "before-fail" in body["output"] and "KALLICHORE_STARTUP" not in body["output"]


async def test_env_var_actions_replace_append_prepend_are_visible_in_the_kernel(
    daemon: RunningDaemon,
) -> None:
    env = [
        {"action": "replace", "name": "KC_REPLACED", "value": "one"},
        {"action": "replace", "name": "KC_REPLACED", "value": "two"},
        {"action": "replace", "name": "KC_APPENDED", "value": "base"},
        {"action": "append", "name": "KC_APPENDED", "value": ":tail"},
        {"action": "replace", "name": "KC_PREPENDED", "value": "mid"},
        {"action": "prepend", "name": "KC_PREPENDED", "value": "pre:"},
        {"action": "append", "name": "KC_FRESH_APPEND", "value": "only"},
        {"action": "prepend", "name": "PATH", "value": "/kc/bin:"},
    ]
    names = ["KC_REPLACED", "KC_APPENDED", "KC_PREPENDED", "KC_FRESH_APPEND", "PATH"]
    values = await start_and_print(daemon, names, env=env)
    assert values == ["two", "base:tail", "pre:mid", "only", "/kc/bin:" + os.environ["PATH"]]
    sessions = (await daemon.client.get("/sessions")).json()["sessions"]
    initial = (await session_json(daemon, sessions[0]["session_id"]))["initial_env"]
    assert [initial[n] for n in names] == values
    assert initial["HOME"] == os.environ["HOME"]  # the server's environment is the base


@pytest.mark.parametrize(
    ("name", "fields", "mode"),
    [
        ("none", {"startup_environment": "none"}, "direct"),
        ("shell", {"startup_environment": "shell"}, "shell"),
        ("shell_bash", {"startup_environment": "shell",
                        "env": [{"action": "replace", "name": "SHELL", "value": "/bin/bash"}]},
         "shell"),
    ],
)
async def test_a_subprocess_of_the_kernel_runs_in_every_startup_environment(
    daemon: RunningDaemon, name: str, fields: dict[str, Any], mode: str
) -> None:
    # Row 22: the kernel runs a script through subprocess and its output comes back.
    fields.setdefault("env", [])
    fields["env"] = [*fields["env"], {"action": "replace", "name": "TEST_VAR", "value": name}]
    session_id = await daemon.create(connection_timeout=15, **fields)
    response = await daemon.start(session_id)
    assert response.status_code == 200, response.text
    script = KERNELS / "startup_probe.py"
    code = ("import subprocess, sys\n"
            f"print(subprocess.run([sys.executable, {str(script)!r}, 'test_{name}', {mode!r}],"
            " capture_output=True, text=True, check=True).stdout)")
    async with open_channel(daemon, session_id) as channel:
        msg_id = await channel.execute(code)
        out = stream_text(await channel.wait_done(msg_id), msg_id)
    for line in (f"=== START test_{name} ===", f"Test marker: test_{name}",
                 f"Expected mode: {mode}", f"TEST_VAR={name}", f"=== END test_{name} ==="):
        assert line in out.splitlines(), out
    if name == "shell_bash":  # the session's SHELL reaches the kernel's children
        assert "SHELL=/bin/bash" in out.splitlines(), out
