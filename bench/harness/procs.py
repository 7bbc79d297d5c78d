"""Starting and reliably stopping server subprocesses; HTTP clients; process measurements."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil


def http_client(base_url: str, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )
    return httpx.AsyncClient(
        base_url=base_url, headers=headers or {}, timeout=120.0, transport=transport
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    finally:
        log.close()


def log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def terminate(proc: subprocess.Popen, grace: float, extra: list[psutil.Process]) -> None:
    """SIGTERM, wait grace seconds, SIGKILL; then kill any listed descendant still alive."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    kill_all(extra)


def kill_all(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


async def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"did not write {path} within {timeout:.0f}s")
        await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def ipykernel_child(parent: int | None) -> int | None:
    """The pid of the one ipykernel that `parent` (this process when None: the raw floor's
    kernels are ours) started, or None if there is not exactly one."""
    try:
        children = psutil.Process(parent or os.getpid()).children()
        found = [c.pid for c in children if "ipykernel_launcher" in " ".join(c.cmdline())]
    except psutil.Error:
        return None
    return found[0] if len(found) == 1 else None


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)
