"""kallichore-trio: the daemon as a subprocess, HTTP through httpx, channels over a WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import procs, wire, wsclient
from .session import BenchError, KernelKind, Session, Target


class KallichoreSession(Session):
    def __init__(self, target: KallichoreTarget, session_id: str) -> None:
        super().__init__("kallichore-trio")
        self.target = target
        self.sid = session_id
        self.ws: wsclient.WebSocket | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_message(self, payload: bytes, is_text: bool) -> None:
        frame = wire.loads(payload)
        if frame.get("kind") == "jupyter":
            parent = frame.get("parent_header")
            self.deliver(
                frame["channel"],
                frame["header"]["msg_type"],
                parent["msg_id"] if parent else None,
                frame["content"],
            )
        elif "exited" in frame and not self.exited.done():
            self.exited.set_result(int(frame["exited"]))

    def send(self, channel: str, hdr: dict[str, Any], content: dict[str, Any]) -> None:
        assert self.ws is not None
        msg = {
            "header": hdr,
            "parent_header": None,
            "channel": channel,
            "content": content,
            "metadata": {},
            "buffers": [],
        }
        self.ws.send_text(json.dumps(msg))

    async def interrupt(self) -> None:
        r = await self.target.http.post(f"/sessions/{self.sid}/interrupt")
        r.raise_for_status()

    async def close(self) -> None:
        if self.closed:
            return
        http = self.target.http
        with contextlib.suppress(Exception):
            await self.request("shutdown_request", {"restart": False}, "control", "reply")
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), 10)
            except TimeoutError:
                await http.post(f"/sessions/{self.sid}/kill")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.exited), 5)
        self.closed = True
        with contextlib.suppress(Exception):
            await http.delete(f"/sessions/{self.sid}")
        if self.ws is not None:
            await self.ws.close()


class KallichoreTarget(Target):
    name = "kallichore-trio"

    def __init__(self, command: list[str], log_dir: Path, interrupt_mode: str = "signal") -> None:
        self.command = command  # e.g. [python, "-m", "kallichore_trio"] or ["kcserver"]
        self.log_path = log_dir / "kallichore-trio.log"
        self.interrupt_mode = interrupt_mode
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.port = 0
        self._http: httpx.AsyncClient | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-kt-")

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "target not started"
        return self._http

    async def start(self) -> None:
        conn_file = Path(self._tmp.name) / "server.json"
        argv = [*self.command, "--transport", "tcp", "--port", "0",
                "--token", "none", "--connection-file", str(conn_file)]  # fmt: skip
        self.proc = procs.spawn(argv, self.log_path)
        try:
            await procs.wait_for_file(conn_file, self.proc, 30)
        except RuntimeError as e:
            raise BenchError(f"kallichore-trio {e}\n{procs.log_tail(self.log_path)}") from None
        info = json.loads(conn_file.read_text())
        base = info["base_path"]
        self.port = urlsplit(base).port or int(info["port"])
        self.pid = int(info.get("server_pid") or self.proc.pid)
        token = info.get("bearer_token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = procs.http_client(base, headers)

    async def stop(self) -> None:
        if self.proc is None:
            return
        leftovers = procs.descendants(self.proc.pid)
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.post("/shutdown", timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, 15)
            await self._http.aclose()
            self._http = None
        procs.terminate(self.proc, 10, leftovers)
        self.proc = None
        self._tmp.cleanup()

    def server_pid(self) -> int | None:
        return self.pid

    def _argv(self, kind: KernelKind) -> list[str]:
        if kind == "flood":
            flood = str(Path(__file__).resolve().parent.parent / "flood_kernel.py")
            return [sys.executable, flood, "-f", "{connection_file}"]
        return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]

    async def open_session(self, kind: KernelKind) -> Session:
        sid = f"bench-{uuid.uuid4().hex[:12]}"
        body = {
            "session_id": sid,
            "display_name": f"bench {kind}",
            "language": "python",
            "username": "bench",
            "input_prompt": "",
            "continuation_prompt": "",
            "argv": self._argv(kind),
            "session_mode": "console",
            "working_directory": tempfile.gettempdir(),
            "env": [],
            "interrupt_mode": self.interrupt_mode,
            "startup_environment": "none",
            "connection_timeout": 60,
        }
        r = await self.http.put("/sessions", json=body)
        if r.status_code != 200:
            raise BenchError(f"PUT /sessions: {r.status_code} {r.text[:300]}")
        session = KallichoreSession(self, sid)
        try:
            session.ws = await wsclient.connect(
                "127.0.0.1", self.port, f"/sessions/{sid}/channels", session.on_message
            )
            r = await self.http.post(f"/sessions/{sid}/start", timeout=120)
            if r.status_code != 200 or r.json().get("status") != "ok":
                raise BenchError(f"POST start: {r.status_code} {r.text[:300]}")
        except BaseException:
            await session.close()
            raise
        return session
