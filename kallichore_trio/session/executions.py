"""The executions a session follows, and POST /sessions/{id}/execute (the I/O side of
core.collector).

Every non-silent execute_request on its way to the kernel, whichever way it came (the WebSocket
client or /execute), gets an `ExecutionCollector` here, keyed by its msg_id. The session hands
over each kernel message whose parent is followed (`observe`); once the request's execute_reply
and idle status have both come, its history entry is recorded and a waiting /execute is woken.
A request dropped from the execution queue before it was sent is forgotten; one that was sent
when the kernel exited is recorded with what it produced, and its /execute answered
`channel_closed`.

Bounds: the last HISTORY_LENGTH entries per session; at most MAX_FOLLOWED requests followed at
once (the oldest is forgotten past that); what each collector keeps is bounded by its window
(core.collector).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio
import zmq

from kallichore_trio import wire
from kallichore_trio.core import HISTORY_WINDOW, REPLY_WINDOW, ExecutionCollector
from kallichore_trio.errors import ExecuteFailed, ExecuteTimeout, KallichoreError
from kallichore_trio.models import BodyError, ExecuteRequest

if TYPE_CHECKING:
    from kallichore_trio.config import Config
    from kallichore_trio.kernel.kernel import Kernel
    from kallichore_trio.models import Status

log = logging.getLogger(__name__)


class ExecutionHost(Protocol):
    """What `execute` needs of a session (session.Session): its one message path, its
    interrupt, and what it is running."""

    session_id: str
    config: Config
    executions: Executions
    kernel: Kernel | None

    @property
    def status(self) -> Status: ...

    async def deliver(self, msg: wire.ClientMessage) -> None: ...

    async def interrupt(self) -> None: ...

#: History entries kept per session.
HISTORY_LENGTH = 100
#: Requests followed at once: the execution queue's capacity, and some room for the active one.
MAX_FOLLOWED = 10_100


def _now_ms() -> int:
    return int(time.time() * 1000)


def attribution(metadata: Any) -> tuple[str | None, str | None]:
    """(source, agent) from a request's `metadata.attribution`."""
    found = metadata.get("attribution") if isinstance(metadata, dict) else None
    if not isinstance(found, dict):
        return None, None
    source, agent = found.get("source"), found.get("agent_name")
    return (source if isinstance(source, str) else None,
            agent if isinstance(agent, str) else None)


@attrs.define(eq=False)
class Followed:
    """One request being followed."""

    collector: ExecutionCollector
    #: Goes into the history once done (false for silent requests).
    record: bool
    #: When it was sent to the kernel (ms since the epoch); None while queued.
    sent_at: int | None = None
    #: Set when it is done or failed, for the /execute waiting on it.
    finished: trio.Event | None = None
    failure: KallichoreError | None = None


class Executions:
    def __init__(self) -> None:
        #: Followed requests by msg_id. The session checks its truthiness before anything else.
        self.followed: dict[str, Followed] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LENGTH)
        self._status_changed: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<Executions followed={len(self.followed)} history={len(self.history)}>"

    # ---- from the session ----------------------------------------------------------------

    def requested(self, msg: wire.ClientMessage) -> None:
        """An execute_request (with code) is being delivered: follow it unless it is silent or
        already followed (an /execute registered it first)."""
        if msg.msg_id in self.followed or msg.content.get("silent") is True:
            return
        source, agent = attribution(msg.metadata)
        collector = ExecutionCollector(msg.content["code"], source=source, agent=agent,
                                       window=HISTORY_WINDOW)
        self.follow(msg.msg_id, Followed(collector, record=True))

    def sent(self, msg_id: str) -> None:
        followed = self.followed.get(msg_id)
        if followed is not None and followed.sent_at is None:
            followed.sent_at = _now_ms()

    def observe(self, msg: wire.KernelMessage) -> None:
        """A kernel message; called only while something is followed."""
        parent = msg.parent_header
        if parent is None:
            return
        msg_id = parent["msg_id"]
        followed = self.followed.get(msg_id)
        if followed is None:
            return
        collector = followed.collector
        collector.feed(msg.msg_type, msg.content)
        if collector.done:
            del self.followed[msg_id]
            self._record(followed)
            if followed.finished is not None:
                followed.finished.set()

    def dropped(self, requests: list[wire.ClientMessage]) -> None:
        """Requests the execution queue let go of (interrupt, shutdown, exit, or full). One
        already sent is still running (its reply will come) or ends with `kernel_exited`."""
        for msg in requests:
            followed = self.followed.get(msg.msg_id)
            if followed is None or followed.sent_at is not None:
                continue
            del self.followed[msg.msg_id]
            self._fail(followed, ExecuteFailed(
                "send_failed", "the request was dropped from the execution queue (by an "
                "interrupt, a shutdown or the kernel's exit) before it reached the kernel"))

    def kernel_exited(self) -> None:
        """The kernel is gone: requests sent to it will never finish."""
        for msg_id, followed in list(self.followed.items()):
            if followed.sent_at is None:
                continue  # held for the next kernel
            del self.followed[msg_id]
            self._record(followed)
            self._fail(followed, ExecuteFailed(
                "channel_closed", "the kernel exited before the execution finished"))

    def status_changed(self) -> None:
        event = self._status_changed
        if event is not None:
            self._status_changed = None
            event.set()

    def recent(self, n: int) -> list[dict[str, Any]]:
        return list(self.history)[-n:] if n else []

    # ---- internals -------------------------------------------------------------------------

    def follow(self, msg_id: str, followed: Followed) -> None:
        while len(self.followed) >= MAX_FOLLOWED:
            oldest = next(iter(self.followed))
            log.warning("following too many executions; forgot %s", oldest)
            self._fail(self.followed.pop(oldest), ExecuteFailed(
                "channel_closed", "too many executions were pending; this one was forgotten"))
        self.followed[msg_id] = followed

    def _record(self, followed: Followed) -> None:
        if followed.record:
            self.history.append(
                followed.collector.history_entry(followed.sent_at or _now_ms()))

    @staticmethod
    def _fail(followed: Followed, failure: KallichoreError) -> None:
        followed.failure = failure
        if followed.finished is not None:
            followed.finished.set()

    async def wait_status_change(self) -> None:
        if self._status_changed is None:
            self._status_changed = trio.Event()
        await self._status_changed.wait()


def check_request(request: ExecuteRequest) -> None:
    timeout = request.timeout_seconds
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise BodyError(f"timeout_seconds must be a positive number of seconds, not {timeout}")


def execute_message(request: ExecuteRequest,
                    metadata: dict[str, Any] | None = None) -> wire.ClientMessage:
    return wire.ClientMessage(
        msg_id=uuid.uuid4().hex,
        msg_type="execute_request",
        parent=None,
        channel="shell",
        content={
            "code": request.code,
            "silent": request.silent,
            "store_history": request.store_history,
            "user_expressions": {},
            # Nobody could answer an input_request: input() fails at once instead of hanging.
            "allow_stdin": False,
            "stop_on_error": request.stop_on_error,
        },
        metadata=dict(metadata or {}),
    )


async def execute(session: ExecutionHost, request: ExecuteRequest, *,
                  metadata: dict[str, Any] | None = None,
                  announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `request` through the session's one message path and answer its result once the
    execute_reply and the idle status have come (the `executeResponse` body). `metadata` goes
    on the request (an agent's `attribution`, recorded in the history); `announce` is called
    with the msg_id just before the request is queued (MCP's executionRequested)."""
    check_request(request)
    timeouts = session.config.timeouts
    executions = session.executions
    with trio.move_on_after(timeouts.execute_starting):
        while session.status == "starting":
            await executions.wait_status_change()
    kernel = session.kernel
    if session.status in ("starting", "exited") or kernel is None or not kernel.running:
        raise ExecuteFailed("session_not_ready",
                            f"Session {session.session_id} has no running kernel "
                            f"(status {session.status})")
    msg = execute_message(request, metadata)
    source, agent = attribution(msg.metadata)
    collector = ExecutionCollector(request.code, source=source, agent=agent, window=REPLY_WINDOW)
    followed = Followed(collector, record=not request.silent, finished=trio.Event())
    executions.follow(msg.msg_id, followed)
    if announce is not None:
        announce(msg.msg_id)
    try:
        await session.deliver(msg)
    except (trio.ClosedResourceError, trio.BrokenResourceError, zmq.ZMQError) as exc:
        executions.followed.pop(msg.msg_id, None)
        raise ExecuteFailed("send_failed", f"could not send the request to the kernel: {exc}"
                            ) from None
    timeout = request.timeout_seconds or timeouts.execute_default
    finished = followed.finished
    assert finished is not None
    try:
        with trio.move_on_after(timeout):
            await finished.wait()
        if not finished.is_set():
            await _interrupt(session, finished, timeout)
            raise ExecuteTimeout(timeout)
    finally:
        followed.finished = None  # nobody waits any more (also when this task is cancelled)
        if not finished.is_set() and not followed.record:
            executions.followed.pop(msg.msg_id, None)
    if followed.failure is not None:
        raise followed.failure
    return collector.result()


async def _interrupt(session: ExecutionHost, finished: trio.Event, timeout: float) -> None:
    """Interrupt the kernel as POST /interrupt does, then give the interrupted request a
    moment to end: a kernel that stops on an error aborts requests that reach it before it
    has, so the caller's next request would otherwise fail for no reason of its own."""
    log.info("session %s: /execute timed out after %g s; interrupting the kernel",
             session.session_id, timeout)
    try:
        await session.interrupt()
    except (KallichoreError, trio.ClosedResourceError, trio.BrokenResourceError,
            zmq.ZMQError) as exc:
        log.warning("session %s: could not interrupt after a timeout: %s",
                    session.session_id, exc)
        return
    with trio.move_on_after(session.config.timeouts.execute_interrupted):
        await finished.wait()
