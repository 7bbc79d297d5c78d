"""The floor: jupyter_client's AsyncKernelManager launches the kernel, and a direct ZeroMQ
client (DEALER shell/control, SUB iopub) talks to it. No supervisor process in between."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager

from . import wire
from .session import BenchError, KernelKind, Session, Target

SPEC = {"ipykernel": "bench-python", "flood": "bench-flood"}
DRAIN_BATCH = 1000
NOBLOCK, RCVMORE = int(zmq.NOBLOCK), int(zmq.RCVMORE)


class RawSession(Session):
    def __init__(self, ctx: zmq.asyncio.Context, km: AsyncKernelManager) -> None:
        super().__init__("raw")
        self.km = km
        info = km.get_connection_info()
        key = info["key"]
        self.signer = wire.Signer(key if isinstance(key, bytes) else key.encode())
        ip, transport = info["ip"], info["transport"]
        ident = self.client_session.encode()
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        for channel, kind in (("shell", zmq.DEALER), ("control", zmq.DEALER), ("iopub", zmq.SUB)):
            sock = ctx.socket(kind)
            sock.linger = 0
            if kind == zmq.SUB:
                sock.rcvhwm = 0
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                sock.setsockopt(zmq.IDENTITY, ident)
            sock.connect(f"{transport}://{ip}:{info[channel + '_port']}")
            self.socks[channel] = sock
        self.sync = {ch: zmq.Socket.shadow(s.underlying) for ch, s in self.socks.items()}
        self.pumps = [asyncio.create_task(self._pump(ch)) for ch in self.socks]

    async def _pump(self, channel: str) -> None:
        """One owner task per socket: wait readable, then drain without blocking."""
        asock, sock = self.socks[channel], self.sync[channel]
        while True:
            await asock.poll(flags=zmq.POLLIN)
            for _ in range(DRAIN_BATCH):
                try:
                    frames = [sock.recv(NOBLOCK)]
                except zmq.Again:
                    break
                while sock.getsockopt(RCVMORE):  # cheaper than recv_multipart's enum handling
                    frames.append(sock.recv(NOBLOCK))
                try:
                    hdr, parent, content = wire.unpack(self.signer, frames)
                except wire.BadMessage:
                    continue
                self.deliver(channel, hdr["msg_type"], parent.get("msg_id"), content)
            else:
                await asyncio.sleep(0)

    def send(self, channel: str, hdr: dict[str, Any], content: dict[str, Any]) -> None:
        try:  # never block the event loop: a DEALER with no live peer would wait forever
            self.sync[channel].send_multipart(wire.pack(self.signer, hdr, content), NOBLOCK)
        except zmq.Again:
            raise BenchError(f"raw: {channel} socket cannot send (kernel gone?)") from None

    async def interrupt(self) -> None:
        await self.km.interrupt_kernel()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.pumps:
            task.cancel()
        for sock in self.socks.values():
            sock.close(linger=0)
        try:
            await asyncio.wait_for(self.km.shutdown_kernel(now=False), 15)
        except Exception:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.km.shutdown_kernel(now=True), 10)


class RawTarget(Target):
    name = "raw"

    def __init__(self) -> None:
        self.ctx: zmq.asyncio.Context | None = None

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()

    async def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
            self.ctx = None

    async def open_session(self, kind: KernelKind) -> Session:
        assert self.ctx is not None
        km = AsyncKernelManager(kernel_name=SPEC[kind])
        await km.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        session = RawSession(self.ctx, km)
        try:
            await session.kernel_info(timeout=60, until_iopub=True)
        except BaseException:
            await session.close()
            raise
        return session


