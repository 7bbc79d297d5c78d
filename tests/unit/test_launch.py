"""kallichore_trio.kernel.launch against real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from kallichore_trio.kernel import launch

NOBODY = 65534


def test_signal_group_reaches_a_group_and_reports_one_that_is_gone() -> None:
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert launch.signal_group(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert not launch.signal_group(proc.pid, signal.SIGTERM)  # reaped: no such group
    finally:
        proc.kill()
        proc.wait()


def test_signal_group_returns_false_for_a_process_that_is_not_ours() -> None:
    """EPERM on the group and on the process (an id that now belongs to another user) is a
    plain False, not an exception: the cleanup after a kernel's exit must not fail on it."""
    target = subprocess.Popen(["sleep", "30"], start_new_session=True)  # our own user's group
    try:
        if os.geteuid() == 0:
            # Root may signal anything: ask from a child that has given up root.
            code = (  # imports first: the venv may not be readable by nobody
                "import os; from kallichore_trio.kernel import launch; "
                f"os.setgid({NOBODY}); os.setuid({NOBODY}); "
                f"print(launch.signal_group({target.pid}, 0))"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=30, check=False)  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "False"
        else:
            if os.getpgid(1) != 1 or psutil.Process(1).uids().real == os.getuid():
                pytest.skip("pid 1 is not another user's group leader here")
            assert launch.signal_group(1, 0) is False  # init: another user's group
        assert target.poll() is None  # signal 0 only asks; the target lives on
    finally:
        target.kill()
        target.wait()
