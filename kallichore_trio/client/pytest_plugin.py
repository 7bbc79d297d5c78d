"""The pytest plugin (entry point `pytest11`): fixtures that give a test a supervised kernel.

Installing kallichore-trio enables it; it does nothing until a test uses one of its fixtures:

* `kcserver` — a daemon for the test session: the real `kcserver` process in a temporary
  directory (runtime dir, sockets, log), shut down at the end with every kernel it started
  (checked). `--kc-server-url` / `--kc-connection-file` use a daemon that already runs.
* `kc_client` — a synchronous `Client` on it; sessions a test leaves running are killed and
  removed at teardown, and reported.
* `kernel_session` — a started kernel (`Session`): this interpreter's ipykernel, or the
  kernelspec of `@pytest.mark.kernel("ir")` / `--kc-kernel NAME`.
* `kc_async_client`, `async_kernel_session` — the same on Trio, for pytest-trio tests.

When a test that used a session fails, the report shows the kernel's own output, the last
execution's stdout/stderr and the last messages and events.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest

from kallichore_trio.client import discovery
from kallichore_trio.client.aclient import AsyncClient
from kallichore_trio.client.session import AsyncSession
from kallichore_trio.client.sync import Client, Session

#: Environment for the default ipykernel: debugpy otherwise warns about frozen modules on the
#: kernel's stderr, now and then inside a cell's captured output.
KERNEL_ENV = {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}
#: The kcserver start, in seconds before --kc-timeout-scale.
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 30.0

_SESSIONS = pytest.StashKey[list[Any]]()
_LEFT_RUNNING = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kallichore", "kallichore-trio kernels (kcserver fixtures)")
    group.addoption("--kc-server-url", metavar="URL",
                    help="use the daemon at URL (token from $KALLICHORE_TOKEN) instead of "
                         "starting one")
    group.addoption("--kc-connection-file", metavar="PATH",
                    help="use the daemon of this connection file instead of starting one")
    group.addoption("--kc-kernel", metavar="NAME",
                    help="kernelspec for kernel_session (default: this Python's ipykernel)")
    group.addoption("--kc-timeout-scale", type=float, default=1.0, metavar="X",
                    help="multiply every kallichore client timeout by X (slow machines)")
    group.addoption("--kc-server-scope", default="session",
                    choices=["session", "package", "module", "class", "function"],
                    help="how long one kcserver fixture lives (default: session)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel(name): the kernelspec kernel_session starts (kallichore plugin)")


def _scope(fixture_name: str, config: pytest.Config) -> str:
    return config.getoption("--kc-server-scope") or "session"


@attrs.define
class KcServer:
    """A daemon the tests talk to; `process` is None when it was already running."""

    address: discovery.ServerAddress
    timeout_scale: float
    connection_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    directory: Path | None = None

    def client(self, **kw: Any) -> Client:
        kw.setdefault("timeout_scale", self.timeout_scale)
        return Client(self.address, **kw)

    def async_client(self, **kw: Any) -> AsyncClient:
        kw.setdefault("timeout_scale", self.timeout_scale)
        return AsyncClient(self.address, **kw)

    def log(self) -> str:
        if self.directory is None:
            return ""
        parts = []
        for name in ("kcserver.log", "kcserver.out"):
            path = self.directory / name
            with contextlib.suppress(OSError):
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "".join(parts)


def start_kcserver(timeout_scale: float = 1.0, *, transport: str = "tcp",
                   log_level: str | None = None) -> KcServer:
    """Run `kcserver` (this interpreter's) in a fresh temporary directory; returns once its
    connection file is written. Stop it with `stop_kcserver`."""
    directory = Path(tempfile.mkdtemp(prefix="kcpt-", dir="/tmp"))  # short: socket paths
    conn = directory / "connection.json"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(directory / "runtime"))
    env.pop("KALLICHORE_CONNECTION_FILE", None)
    argv = [sys.executable, "-m", "kallichore_trio", "--transport", transport,
            "--connection-file", str(conn), "--socket-dir", str(directory),
            "--log-file", str(directory / "kcserver.log"),
            *([] if log_level is None else ["--log-level", log_level])]
    with open(directory / "kcserver.out", "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)
    server = KcServer(discovery.ServerAddress("http://localhost"), timeout_scale, conn,
                      process, directory)
    deadline = time.monotonic() + SERVER_START_TIMEOUT * timeout_scale
    while True:
        # Like Positron: poll until the (atomically written) file parses.
        if conn.exists():
            with contextlib.suppress(ValueError, OSError):
                server.address = discovery.from_document(json.loads(conn.read_text()),
                                                         path=conn)
                return server
        if process.poll() is not None:
            log = server.log()
            shutil.rmtree(directory, ignore_errors=True)
            raise RuntimeError(f"kcserver exited with status {process.returncode} before "
                               f"writing its connection file:\n{log}")
        if time.monotonic() > deadline:
            stop_kcserver(server)
            raise RuntimeError(f"kcserver did not write {conn} within "
                               f"{SERVER_START_TIMEOUT * timeout_scale:g} s")
        time.sleep(0.05)


def stop_kcserver(server: KcServer) -> list[int]:
    """Shut the daemon down and remove its directory; returns the pids of kernels that were
    still alive afterwards (they are killed)."""
    process = server.process
    if process is None:
        return []
    try:
        kernels = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kernels = []
    if process.poll() is None:
        with contextlib.suppress(Exception), server.client() as client:
            client.shutdown()
        try:
            process.wait(SERVER_STOP_TIMEOUT * server.timeout_scale)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _, alive = psutil.wait_procs(kernels, timeout=5 * server.timeout_scale)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if server.directory is not None:
        shutil.rmtree(server.directory, ignore_errors=True)
    return [p.pid for p in alive]


@pytest.fixture(scope=_scope)
def kcserver(pytestconfig: pytest.Config) -> Iterator[KcServer]:
    """The daemon the kallichore fixtures use (see the module docstring)."""
    scale = pytestconfig.getoption("--kc-timeout-scale")
    url = pytestconfig.getoption("--kc-server-url")
    conn = pytestconfig.getoption("--kc-connection-file")
    if url is not None:
        yield KcServer(discovery.find_server(url=url, token=os.environ.get("KALLICHORE_TOKEN")),
                       scale)
        return
    if conn is not None:
        yield KcServer(discovery.from_connection_file(conn), scale, Path(conn))
        return
    server = start_kcserver(scale)
    try:
        yield server
    finally:
        left = stop_kcserver(server)
        if left:
            pytest.fail(f"kcserver left kernel processes running after shutdown: {left} "
                        "(killed)", pytrace=False)


def _track(request: pytest.FixtureRequest, session: Any) -> None:
    node = request.node
    node.stash.setdefault(_SESSIONS, []).append(session)


@pytest.fixture
def kc_client(kcserver: KcServer, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A synchronous Client of `kcserver`; sessions it leaves running are cleaned up."""
    with kcserver.client() as client:
        before = {s.session_id for s in client.sessions()}
        _track(request, client)
        try:
            yield client
        finally:
            _clean_up(request, client, before)


def _clean_up(request: pytest.FixtureRequest, client: Client, before: set[str]) -> None:
    left = []
    for info in client.sessions():
        if info.session_id in before:
            continue
        if info.status not in ("exited", "uninitialized"):
            left.append(f"{info.session_id} (status {info.status}, pid {info.process_id})")
        client.remove_session(info.session_id)
    if left:
        request.node.stash[_LEFT_RUNNING] = left
        request.config.stash.setdefault(_LEFT_RUNNING, []).extend(
            f"{request.node.nodeid}: {name}" for name in left)


def _kernel_name(request: pytest.FixtureRequest) -> str | None:
    marker = request.node.get_closest_marker("kernel")
    if marker is not None and marker.args:
        return str(marker.args[0])
    return request.config.getoption("--kc-kernel")


@pytest.fixture
def kernel_session(kc_client: Client, request: pytest.FixtureRequest) -> Iterator[Session]:
    """A started kernel; shut down after the test."""
    name = _kernel_name(request)
    session = kc_client.start_kernel(name, env=KERNEL_ENV if name is None else None)
    _track(request, session)
    try:
        yield session
    finally:
        session.shutdown()


@pytest.fixture
async def kc_async_client(kcserver: KcServer, request: pytest.FixtureRequest
                          ) -> AsyncIterator[AsyncClient]:
    """An AsyncClient of `kcserver`, for pytest-trio tests."""
    async with kcserver.async_client() as client:
        _track(request, client)
        yield client


@pytest.fixture
async def async_kernel_session(kc_async_client: AsyncClient, request: pytest.FixtureRequest
                               ) -> AsyncIterator[AsyncSession]:
    """A started kernel on Trio (pytest-trio tests)."""
    name = _kernel_name(request)
    session = await kc_async_client.start_kernel(name, env=KERNEL_ENV if name is None else None)
    _track(request, session)
    try:
        yield session
    finally:
        await session.shutdown()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    report = yield
    if report.failed:
        for session in _sessions_of(item):
            report.sections.append((f"kallichore session {session.id}",
                                    session.diagnostics()))
    if call.when == "teardown" and _LEFT_RUNNING in item.stash:
        report.sections.append(("kallichore: kernels left running (cleaned up)",
                                "\n".join(item.stash[_LEFT_RUNNING])))
    return report


def _sessions_of(item: pytest.Item) -> list[Any]:
    """The sessions a test used: its kernel_session and those of its clients, once each."""
    found: dict[str, Any] = {}
    for tracked in item.stash.get(_SESSIONS, []):
        if isinstance(tracked, Client):
            found.update((s.id, s) for s in list(tracked._sessions.values()))
        elif isinstance(tracked, AsyncClient):
            found.update((s.id, s) for s in list(tracked._sessions.values()))
        else:
            found.setdefault(tracked.id, tracked)
    return list(found.values())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    left = config.stash.get(_LEFT_RUNNING, [])
    if left:
        terminalreporter.section("kallichore: kernels left running by tests (cleaned up)")
        for line in left:
            terminalreporter.line(line)
