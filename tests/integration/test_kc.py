"""The `kc` command, run as a user runs it (the installed script, a subprocess) against a real
`kcserver` process and real ipykernel kernels."""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kallichore_trio.client.pytest_plugin import KcServer, start_kcserver, stop_kcserver

KC = str(Path(sys.executable).parent / "kc")
KERNEL_ENV = ["--env", "PYDEVD_DISABLE_FILE_VALIDATION=1"]


def kc(server: KcServer, *args: str, input: str | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [KC, *args]
    if server.connection_file is not None and env is None:
        argv += ["--connection-file", str(server.connection_file)]
    return subprocess.run(argv, capture_output=True, text=True, input=input, timeout=180,
                          env=env, check=False)


@pytest.fixture
def py(kcserver: KcServer) -> Iterator[str]:
    """A started python3 kernel (the kernelspec, as a user would), removed afterwards."""
    session_id = f"py-{uuid.uuid4().hex[:6]}"
    started = kc(kcserver, "start", "python3", "--id", session_id, *KERNEL_ENV)
    assert started.returncode == 0, started.stderr
    assert started.stdout == f"{session_id}\n"
    yield session_id
    kc(kcserver, "rm", session_id)


def test_start_then_exec_prints_the_output(kcserver: KcServer, py: str) -> None:
    done = kc(kcserver, "exec", py, "print(6*7)")
    assert (done.returncode, done.stdout, done.stderr) == (0, "42\n", "")


def test_exec_exits_non_zero_on_a_kernel_error(kcserver: KcServer, py: str) -> None:
    done = kc(kcserver, "exec", py, "print('partial')\n1/0")
    assert done.returncode == 1
    assert done.stdout == "partial\n"
    assert "ZeroDivisionError" in done.stderr
    assert "\x1b[" not in done.stderr  # no colours off a terminal


def test_exec_reads_code_from_stdin_and_saves_images(kcserver: KcServer, py: str,
                                                     tmp_path: Path) -> None:
    code = ("import base64\nfrom IPython.display import Image, display\n"
            "png = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
            "2mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==')\n"
            "display(Image(data=png, format='png'))\nprint('shown')\n")
    done = kc(kcserver, "exec", py, "-", "--images-dir", str(tmp_path), input=code)
    assert done.returncode == 0, done.stderr
    images = list(tmp_path.glob("*.png"))
    assert len(images) == 1 and images[0].read_bytes().startswith(b"\x89PNG")
    assert f"[image/png saved to {images[0]}]" in done.stdout
    assert done.stdout.endswith("shown\n")


def test_global_options_go_before_or_after_the_subcommand(kcserver: KcServer,
                                                          py: str) -> None:
    conn = str(kcserver.connection_file)
    after = subprocess.run([KC, "ls", "--json", "--connection-file", conn],
                           capture_output=True, text=True, timeout=60, check=False)
    before = subprocess.run([KC, "--json", "--connection-file", conn, "ls"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert after.returncode == before.returncode == 0, after.stderr + before.stderr
    for done in (after, before):
        sessions = json.loads(done.stdout)
        assert py in [s["session_id"] for s in sessions]


def test_ls_status_and_lifecycle_commands(kcserver: KcServer, py: str) -> None:
    listing = kc(kcserver, "ls")
    assert listing.returncode == 0
    header, *rows = listing.stdout.splitlines()
    assert header.split("\t")[:3] == ["ID", "KERNEL", "STATUS"]
    assert any(row.split("\t")[0] == py for row in rows)
    status = json.loads(kc(kcserver, "status", "--json").stdout)
    assert status["sessions"] >= 1
    for command in ("interrupt", "restart"):
        assert kc(kcserver, command, py).returncode == 0
    assert kc(kcserver, "exec", py, "print('back')").stdout == "back\n"
    assert kc(kcserver, "kill", py).returncode == 0
    assert kc(kcserver, "rm", py).returncode == 0
    gone = kc(kcserver, "exec", py, "1")
    assert gone.returncode == 1
    assert gone.stderr.startswith("kc: ") and py in gone.stderr


def test_logs_show_what_happened_while_nobody_was_attached(kcserver: KcServer,
                                                           py: str) -> None:
    # Restarting over HTTP attaches nobody: the status events wait for the next client.
    assert kc(kcserver, "restart", py).returncode == 0
    done = kc(kcserver, "logs", py)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("[status: starting") for line in lines)
    assert any(line.startswith("[status: idle") for line in lines)


def test_logs_follow_until_interrupted(kcserver: KcServer, py: str) -> None:
    import signal

    from kallichore_trio.client import Client

    follower = subprocess.Popen([KC, "logs", py, "-f", "--connection-file",
                                 str(kcserver.connection_file)],
                                stdout=subprocess.PIPE, text=True)
    try:
        with Client(kcserver.address) as client:
            deadline = time.monotonic() + 60
            while not client.session_info(py).connected:  # attached: it gets what follows
                assert time.monotonic() < deadline, "kc logs -f never attached"
                time.sleep(0.05)
            client.restart(py)
        assert follower.stdout is not None
        for line in follower.stdout:
            if line.startswith("[status: idle"):
                break
        else:
            raise AssertionError("kc logs -f ended before the kernel was ready")
        follower.send_signal(signal.SIGINT)
        assert follower.wait(30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        assert follower.stdout is not None
        follower.stdout.close()


def test_kernelspecs_lists_python3(kcserver: KcServer) -> None:
    specs = json.loads(kc(kcserver, "kernelspecs", "--json").stdout)
    assert "python3" in specs


def test_errors_are_one_line_saying_what_to_do(tmp_path: Path) -> None:
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    env.pop("KALLICHORE_CONNECTION_FILE", None)
    done = subprocess.run([KC, "ls"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "make run" in done.stderr


def test_kcserver_writes_a_default_connection_file_that_kc_finds(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    env.pop("KALLICHORE_CONNECTION_FILE", None)
    process = subprocess.Popen([sys.executable, "-m", "kallichore_trio", "--transport", "tcp"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        expected = runtime / f"kcserver-{process.pid}.json"
        assert process.stdout is not None
        for line in process.stdout:  # ends at EOF if the daemon dies
            if line.startswith("Connection file:"):
                break
        assert line == f"Connection file: {expected} (kc and kallichore_trio.client find it)\n"
        assert stat.S_IMODE(expected.stat().st_mode) == 0o600
        status = subprocess.run([KC, "status", "--json"], capture_output=True, text=True,
                                env=env, timeout=60, check=False)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["process_id"] == process.pid
        assert subprocess.run([KC, "shutdown"], env=env, timeout=60,
                              check=False).returncode == 0
        assert process.wait(60) == 0
        assert not expected.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


# ---- kc attach, under a pseudo-terminal ----------------------------------------------------


def _controlling_terminal() -> None:
    # A new session whose controlling terminal is the pty, so that ^C becomes SIGINT.
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pty:
    def __init__(self, argv: list[str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                        close_fds=True, preexec_fn=_controlling_terminal,
                                        # No cursor position requests: nobody answers them.
                                        env=dict(os.environ, TERM="xterm",
                                                 PROMPT_TOOLKIT_NO_CPR="1"))
        os.close(slave)
        self.seen = ""
        self.cursor = 0

    def expect(self, text: str, timeout: float = 60) -> None:
        """Wait for text after what earlier expects matched."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[self.cursor:]:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not seen; got {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the other side closed
                    data = b""
                assert data, f"{text!r} not seen before EOF; got {self.seen[-2000:]!r}"
                self.seen += data.decode("utf-8", "replace")
        self.cursor = self.seen.index(text, self.cursor) + len(text)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.process.wait(30)
        finally:
            os.close(self.master)


def test_attach_runs_code_interrupts_and_detaches(kcserver: KcServer, py: str) -> None:
    term = Pty([KC, "attach", py, "--connection-file", str(kcserver.connection_file)])
    try:
        term.expect("In [1]:")
        term.send("print(6*7)\r")
        term.expect("42")
        term.expect("In [2]:")
        term.send("import time; print('sl' + 'eeping', flush=True); time.sleep(60)\r")
        term.expect("sleeping")  # the output, not the echo: the kernel is in the sleep
        term.send("\x03")  # Ctrl-C: interrupts the kernel, not kc
        term.expect("KeyboardInterrupt")
        term.expect("In [3]:")  # the prompt is back: the kernel took the interrupt
        term.send("\x04")  # Ctrl-D: detach
        term.expect("the kernel keeps running")
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
    # The kernel still runs and has kept its state.
    assert kc(kcserver, "exec", py, "print(time.time() > 0)").stdout == "True\n"


def test_start_kcserver_helper_cleans_up_after_itself() -> None:
    server = start_kcserver()
    assert server.directory is not None and server.directory.exists()
    assert stop_kcserver(server) == []
    assert not server.directory.exists()


def test_kc_over_the_unix_socket_transport() -> None:
    server = start_kcserver(transport="socket")
    try:
        assert server.address.uds is not None  # the API on a socket, the channel on another
        assert kc(server, "start", "python3", "--id", "sock", *KERNEL_ENV).returncode == 0
        done = kc(server, "exec", "sock", "print(6*7)")
        assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr
        listing = json.loads(kc(server, "ls", "--json").stdout)
        assert [s["session_id"] for s in listing] == ["sock"]
    finally:
        assert stop_kcserver(server) == []
