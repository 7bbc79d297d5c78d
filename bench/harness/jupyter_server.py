"""Jupyter Server, the best-known peer: /api/kernels over HTTP, channels over a WebSocket.

Started from its own virtualenv with the IOPub rate limits off. The WebSocket speaks the
``v1.kernel.websocket.jupyter.org`` protocol by default (what JupyterLab 4 uses: the server
relays the raw ZeroMQ frames) or the legacy JSON protocol (the server decodes and re-encodes
every message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from . import procs, wire, wsclient
from .session import BenchError, KernelKind, Session, Target

V1 = "v1.kernel.websocket.jupyter.org"
SPEC = {"ipykernel": "bench-python", "flood": "bench-flood"}


def encode_v1(channel: str, parts: list[bytes]) -> bytes:
    chunks = [channel.encode(), *parts]
    offsets = [8 * (len(chunks) + 2)]
    for chunk in chunks:
        offsets.append(offsets[-1] + len(chunk))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(chunks)


def decode_v1(data: bytes) -> tuple[str, list[bytes]]:
    (n,) = struct.unpack_from("<Q", data, 0)
    offsets = struct.unpack_from(f"<{n}Q", data, 8)
    channel = data[offsets[0] : offsets[1]].decode()
    return channel, [data[offsets[i] : offsets[i + 1]] for i in range(1, n - 1)]


class JupyterServerSession(Session):
    def __init__(self, target: JupyterServerTarget, kernel_id: str) -> None:
        super().__init__("jupyter-server")
        self.target = target
        self.kernel_id = kernel_id
        self.ws: wsclient.WebSocket | None = None

    def on_message(self, payload: bytes, is_text: bool) -> None:
        if is_text:  # legacy protocol, or a legacy-encoded message
            msg = wire.loads(payload)
            hdr, parent, content, channel = (
                msg["header"], msg["parent_header"], msg["content"], msg["channel"]
            )  # fmt: skip
        else:
            channel, parts = decode_v1(payload)
            hdr, parent, content = wire.loads(parts[0]), wire.loads(parts[1]), wire.loads(parts[3])
        self.deliver(channel, hdr["msg_type"], parent.get("msg_id") if parent else None, content)

    def send(self, channel: str, hdr: dict[str, Any], content: dict[str, Any]) -> None:
        assert self.ws is not None
        if self.ws.subprotocol == V1:
            parts = [json.dumps(hdr).encode(), b"{}", b"{}", json.dumps(content).encode()]
            self.ws.send_bytes(encode_v1(channel, parts))
        else:
            msg = {"header": hdr, "parent_header": {}, "metadata": {}, "content": content,
                   "channel": channel, "buffers": []}  # fmt: skip
            self.ws.send_text(json.dumps(msg))

    async def interrupt(self) -> None:
        r = await self.target.http.post(f"/api/kernels/{self.kernel_id}/interrupt")
        r.raise_for_status()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ws is not None:
            await self.ws.close()
        with contextlib.suppress(Exception):
            await self.target.http.delete(f"/api/kernels/{self.kernel_id}", timeout=30)


class JupyterServerTarget(Target):
    name = "jupyter-server"

    def __init__(self, python: str, log_dir: Path, jupyter_path: Path, protocol: str) -> None:
        self.python = python
        self.log_path = log_dir / "jupyter-server.log"
        self.jupyter_path = jupyter_path
        self.protocol = protocol
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.token = uuid.uuid4().hex
        self._http: httpx.AsyncClient | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-js-")

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "target not started"
        return self._http

    async def start(self) -> None:
        tmp = Path(self._tmp.name)
        for sub in ("config", "runtime", "root"):
            (tmp / sub).mkdir()
        env = dict(os.environ)
        env.update(
            JUPYTER_PATH=str(self.jupyter_path),
            JUPYTER_CONFIG_DIR=str(tmp / "config"),
            JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        )
        self.port = procs.free_port()
        c = "--ZMQChannelsWebsocketConnection."
        argv = [
            self.python, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ip=127.0.0.1",
            f"--port={self.port}", "--port-retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={tmp / 'root'}", "--ServerApp.log_level=WARN",
            f"{c}limit_rate=False", f"{c}iopub_msg_rate_limit=0", f"{c}iopub_data_rate_limit=0",
        ]  # fmt: skip
        if self.protocol == "legacy":
            argv.append(f"{c}kernel_ws_protocol=")
        self.proc = procs.spawn(argv, self.log_path, env)
        self._http = procs.http_client(
            f"http://127.0.0.1:{self.port}", {"Authorization": f"token {self.token}"}
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"jupyter server exited:\n{procs.log_tail(self.log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get("/api/status", timeout=2)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"jupyter server not up in 60s:\n{procs.log_tail(self.log_path)}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is None:
            return
        leftovers = procs.descendants(self.proc.pid)
        if self._http is not None:
            with contextlib.suppress(Exception):
                kernels = (await self.http.get("/api/kernels")).json()
                await asyncio.gather(
                    *(self.http.delete(f"/api/kernels/{k['id']}", timeout=20) for k in kernels),
                    return_exceptions=True,
                )
            await self._http.aclose()
            self._http = None
        procs.terminate(self.proc, 15, leftovers)  # SIGTERM: Jupyter Server's clean shutdown
        self.proc = None
        self._tmp.cleanup()

    def server_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def open_session(self, kind: KernelKind) -> Session:
        r = await self.http.post("/api/kernels", json={"name": SPEC[kind]}, timeout=120)
        if r.status_code != 201:
            raise BenchError(f"POST /api/kernels: {r.status_code} {r.text[:300]}")
        session = JupyterServerSession(self, r.json()["id"])
        try:
            path = f"/api/kernels/{session.kernel_id}/channels?session_id={session.client_session}"
            session.ws = await wsclient.connect(
                "127.0.0.1",
                self.port,
                path,
                session.on_message,
                headers={"Authorization": f"token {self.token}"},
                subprotocols=[V1] if self.protocol == "v1" else None,
                timeout=120,
            )
            await session.kernel_info(timeout=60)
        except BaseException:
            await session.close()
            raise
        return session
