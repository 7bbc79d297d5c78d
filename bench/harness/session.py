"""What every target offers the workloads: a Target that opens Sessions on one kernel each.

A Session sends requests and routes the messages its transport decodes to the Collector waiting
for that request (by parent msg_id). Everything else is counted and dropped.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import Any, Literal

from . import wire

KernelKind = Literal["ipykernel", "flood"]


class BenchError(Exception):
    pass


class Collector:
    """Gathers what the kernel sends for one request until the request is done.

    Done means: the iopub ``status: idle`` whose parent is the request (``until="idle"``), or
    the shell/control reply to it (``until="reply"``).
    """

    def __init__(self, msg_id: str, until: Literal["idle", "reply"] = "idle") -> None:
        self.msg_id = msg_id
        self.until = until
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.busy: asyncio.Future[None] = loop.create_future()
        self.texts: list[str] = []
        self.n_stream = 0
        self.n_iopub = 0
        self.reply: dict[str, Any] | None = None
        self.first_at = 0.0
        self.last_at = 0.0

    def feed(self, channel: str, msg_type: str, content: Any) -> None:
        self.last_at = time.perf_counter()
        if channel == "iopub":
            if self.n_iopub == 0:
                self.first_at = self.last_at
            self.n_iopub += 1
            if msg_type == "stream":
                self.n_stream += 1
                self.texts.append(content.get("text", ""))
            elif msg_type == "status":
                state = content.get("execution_state")
                if state == "busy" and not self.busy.done():
                    self.busy.set_result(None)
                elif state == "idle" and self.until == "idle" and not self.done.done():
                    self.done.set_result(None)
        elif msg_type.endswith("_reply"):
            self.reply = content
            if self.until == "reply" and not self.done.done():
                self.done.set_result(None)


class Session(ABC):
    """One kernel, reached through one target, with one client channel."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client_session = wire.new_id()
        self.collectors: dict[str, Collector] = {}
        self.unrouted = 0
        self.iopub_seen = 0
        self.closed = False

    # transports call this for every decoded message
    def deliver(self, channel: str, msg_type: str, parent_id: str | None, content: Any) -> None:
        if channel == "iopub":
            self.iopub_seen += 1
        collector = self.collectors.get(parent_id) if parent_id else None
        if collector is None:
            self.unrouted += 1
            return
        collector.feed(channel, msg_type, content)

    def fail_all(self, reason: str) -> None:
        for c in self.collectors.values():
            if not c.done.done():
                c.done.set_exception(BenchError(f"{self.name}: {reason}"))

    @abstractmethod
    def send(self, channel: str, hdr: dict[str, Any], content: dict[str, Any]) -> None:
        """Send one request to the kernel on channel (shell or control)."""

    async def request(
        self,
        msg_type: str,
        content: dict[str, Any],
        channel: str = "shell",
        until: Literal["idle", "reply"] = "idle",
    ) -> Collector:
        """Send a request and return its collector (await ``collector.done`` yourself)."""
        if self.closed:
            raise BenchError(f"{self.name}: session is closed")
        hdr = wire.header(msg_type, self.client_session)
        collector = Collector(hdr["msg_id"], until)
        self.collectors[hdr["msg_id"]] = collector
        self.send(channel, hdr, content)
        return collector

    async def run(
        self,
        msg_type: str,
        content: dict[str, Any],
        timeout: float,
        channel: str = "shell",
        until: Literal["idle", "reply"] = "idle",
    ) -> Collector:
        collector = await self.request(msg_type, content, channel, until)
        try:
            await asyncio.wait_for(asyncio.shield(collector.done), timeout)
        except TimeoutError:
            what = f"{self.name}: no {until} for {msg_type} within {timeout:.0f}s"
            raise BenchError(what) from None
        finally:
            self.collectors.pop(collector.msg_id, None)
        return collector

    async def execute(self, code: str, timeout: float = 60.0) -> Collector:
        content = {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        return await self.run("execute_request", content, timeout)

    async def kernel_info(self, timeout: float = 30.0, until_iopub: bool = False) -> Collector:
        """kernel_info_request until a reply arrives (and, if asked, any iopub message).

        Repeated every 0.25 s: the slow-joiner rule (a SUB misses what came before it joined,
        so a reply alone does not prove that iopub is connected).
        """
        deadline = time.monotonic() + timeout
        # A reply to any of the requests counts: a kernel slower than the repeat (20 starting
        # at once on 2 cores) answers each one late, and waiting only for the newest would
        # never see a reply at all.
        sent: list[Collector] = []
        try:
            while True:
                sent.append(await self.request("kernel_info_request", {}, "shell", "reply"))
                await asyncio.wait([c.done for c in sent], timeout=0.25,
                                   return_when=asyncio.FIRST_COMPLETED)
                reply = next((c for c in sent if c.done.done()), None)
                if reply is not None:
                    reply.done.result()  # a session that failed raises here
                if reply is not None and (not until_iopub or self.iopub_seen):
                    return reply
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: no kernel_info_reply within {timeout:.0f}s")
        finally:
            for c in sent:
                self.collectors.pop(c.msg_id, None)

    @abstractmethod
    async def interrupt(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Shut the kernel down and release the channel (bounded in time; never raises)."""


class Target(ABC):
    """A way to reach kernels: raw ZeroMQ, kallichore-trio, or Jupyter Server."""

    name: str

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None:
        """Stop everything started (bounded in time; never raises)."""

    @abstractmethod
    async def open_session(self, kind: KernelKind) -> Session:
        """Create and start a kernel; return once a kernel_info_reply has arrived."""

    def server_pid(self) -> int | None:
        """The supervisor process whose CPU and memory are measured (None: no supervisor)."""
        return None
