"""AsyncSession: one kernel session seen through its channel.

The channel (docs/protocol.md §4) is opened on first use and held until `close()`: a session has
one client at a time, and attaching evicts the one before (§4.5), so while this object uses
the channel, Positron or `kc attach` on the same session lose it (and the other way round:
`ChannelClosed(evicted=True)`).

One reader task per channel sorts the frames: a kernel message goes to the request it answers
(by parent msg_id) and to the comm it belongs to; a kernel event goes to the event
subscribers. Every queue is bounded: a request's queue makes the reader wait (the daemon holds
the rest), event and comm subscribers that fall behind lose the overflow (counted in
`dropped`). The last messages, events and kernel process output are kept for failure reports.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from kallichore_trio.client import messages as m
from kallichore_trio.client.channel import Channel
from kallichore_trio.client.errors import (
    ChannelClosed,
    ClientError,
    ClientTimeout,
    ExecutionTimeout,
    KernelDied,
    ResumeFailed,
)
from kallichore_trio.client.results import ExecutionResult, result_from
from kallichore_trio.core.collector import ExecutionCollector

if TYPE_CHECKING:
    from kallichore_trio.client.aclient import AsyncClient
    from kallichore_trio.models import ActiveSession

#: What a request's queue holds before the reader waits for its consumer.
REQUEST_QUEUE = 1024
#: What an event or comm subscriber's queue holds before frames are dropped for it.
SUBSCRIBER_QUEUE = 4096
#: Kept for failure reports.
RECENT_MESSAGES = 30
RECENT_OUTPUT_LINES = 200

InputHandler = Callable[[str, bool], "str | Awaitable[str]"]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class InputNotAnswered(ClientError):
    """The kernel asked for input and the answers given ran out."""


def _input_handler(answers: InputHandler | Iterable[str] | None) -> InputHandler | None:
    if answers is None or callable(answers):
        return answers
    queue = deque(answers)

    def next_answer(prompt: str, password: bool) -> str:
        if not queue:
            raise InputNotAnswered(f"the kernel asked for input ({prompt!r}) and no answer "
                                   "was left")
        return queue.popleft()

    return next_answer


class Comm:
    """A comm opened from the client (`AsyncSession.comm_open`)."""

    def __init__(self, session: AsyncSession, comm_id: str, target_name: str) -> None:
        self.session = session
        self.comm_id = comm_id
        self.target_name = target_name
        self._send, self._recv = trio.open_memory_channel[m.Message](SUBSCRIBER_QUEUE)
        self.closed = False

    async def send(self, data: dict[str, Any]) -> None:
        await self.session.send(m.request("comm_msg", {"comm_id": self.comm_id, "data": data}))

    async def receive(self, timeout: float | None = None) -> m.Message:
        """The next comm_msg (or comm_close) the kernel sent on this comm."""
        timeout = self.session._timeout(timeout, "reply")
        with trio.move_on_after(timeout):
            return await self._recv.receive()
        raise ClientTimeout(f"session {self.session.id}: no message on comm {self.comm_id} "
                            f"({self.target_name}) within {timeout:g} s")

    async def close(self, data: dict[str, Any] | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.session._comms.pop(self.comm_id, None)
            await self.session.send(m.request("comm_close", {"comm_id": self.comm_id,
                                                             "data": data or {}}))


class ExecutionStream:
    """The messages of one execute_request, as they come, until it is done (its reply and its
    idle status). Feeds an ExecutionCollector: `result()` once iteration ended."""

    def __init__(self, session: AsyncSession, msg_id: str, code: str,
                 recv: trio.MemoryReceiveChannel[m.Message], timeout: float,
                 on_input: InputHandler | None) -> None:
        deadline = trio.current_time() + timeout if math.isfinite(timeout) else math.inf
        self.session = session
        self.msg_id = msg_id
        self.collector = ExecutionCollector(code)
        self._recv = recv
        self._deadline = deadline
        self.timeout = timeout
        self._on_input = on_input
        self.timed_out = False
        #: FramesLost / SupervisorRestarted notices that came while it ran (result().notices).
        self.notices: list[m.KernelEvent] = []

    def extend_deadline(self, seconds: float) -> None:
        """Wait up to `seconds` more from now; no more input is answered."""
        self._deadline = trio.current_time() + seconds
        self.timeout = seconds
        self._on_input = None

    def __aiter__(self) -> ExecutionStream:
        return self

    async def __anext__(self) -> m.Message:
        if self.collector.done:
            self.session.last_result = self.result()
            raise StopAsyncIteration
        with trio.move_on_at(self._deadline):
            try:
                msg = await self._recv.receive()
            except trio.EndOfChannel:
                raise self.session._failure_for(
                    f"execute_request {self.msg_id}") from None
            self.collector.feed(msg.msg_type, msg.content)
            if msg.msg_type == "input_request" and self._on_input is not None:
                await self._answer(msg)
            return msg
        self.timed_out = True
        raise ExecutionTimeout(
            f"session {self.session.id}: execute_request {self.msg_id} did not finish (no "
            f"{'idle status' if self.collector.replied else 'execute_reply'} yet) within "
            f"{self.timeout:g} s", partial=self.result())

    async def _answer(self, msg: m.Message) -> None:
        assert self._on_input is not None
        prompt = str(msg.content.get("prompt", ""))
        answer = self._on_input(prompt, bool(msg.content.get("password")))
        if inspect.isawaitable(answer):
            answer = await answer
        await self.session.send(m.request("input_reply", {"value": str(answer)},
                                          channel="stdin", parent=(msg.msg_id, msg.msg_type)))

    def result(self) -> ExecutionResult:
        return result_from(self.collector, self.msg_id, self.notices)


class AsyncSession:
    """A kernel session of one daemon. Get it from `AsyncClient.session(id)` or
    `AsyncClient.start_kernel(...)`; it is valid as long as its client is."""

    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client = client
        self.id = session_id
        self._channel: Channel | None = None
        self._streams: dict[str, ExecutionStream] = {}
        #: Called with each FramesLost / SupervisorRestarted that may concern this client's
        #: requests (not the `history` ones), in the reader task: keep it quick.
        self.on_notice: Callable[[m.KernelEvent], object] | None = None
        self._connect_lock = trio.Lock()
        self._waiters: dict[str, trio.MemorySendChannel[m.Message]] = {}
        self._subscribers: list[trio.MemorySendChannel[m.KernelEvent]] = []
        self._comms: dict[str, Comm] = {}
        self._failure: ClientError | None = None
        self._evicted = False
        self._closed_event = trio.Event()
        self.exit_code: int | None = None
        #: The last execution's result (partial when it timed out), for failure reports.
        self.last_result: ExecutionResult | None = None
        self.last_code: str | None = None
        self.dropped = 0
        self.recent_messages: deque[m.Message] = deque(maxlen=RECENT_MESSAGES)
        self.recent_events: deque[m.KernelEvent] = deque(maxlen=RECENT_MESSAGES)
        self.kernel_output: deque[tuple[str, str]] = deque(maxlen=RECENT_OUTPUT_LINES)

    def __repr__(self) -> str:
        return f"<AsyncSession {self.id!r} attached={self.attached}>"

    def _timeout(self, value: float | None, kind: str) -> float:
        return self.client._timeout(value, kind)

    # ---- the channel ---------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._channel is not None

    async def attach(self, *, force: bool = False) -> None:
        """Open the channel now (it opens on first use otherwise). Evicts the session's
        current client. Once another client took the channel from this one, only
        `force=True` takes it back (so that two clients do not evict each other in turn)."""
        async with self._connect_lock:
            if self._channel is not None:
                return
            if self._evicted and not force:
                raise ChannelClosed(f"session {self.id}: another client took the session's "
                                    "channel; attach(force=True) takes it back",
                                    evicted=True)
            self._evicted = False
            timeout = self._timeout(None, "request")
            channel = Channel(self.id, self.client.address,
                              lambda: self.client.channels_path(self.id),
                              ask_resume=self.client.resume,
                              reconnect_timeout=self._timeout(None, "reconnect"))
            with trio.move_on_after(timeout):
                await channel.connect()
                self._failure = None
                self._closed_event = trio.Event()
                self._channel = channel
                self.client._nursery.start_soon(self._read, channel)
                self.client._nursery.start_soon(channel.ack_loop)
                return
            raise ClientTimeout(f"session {self.id}: opening the channel took more than "
                                f"{timeout:g} s")

    @property
    def channel(self) -> Channel | None:
        """The open channel (None when detached): `reconnects`, `last_seq`, and
        `abort_connection()` to break it as a network failure would (tests)."""
        return self._channel

    async def _read(self, channel: Channel) -> None:
        error = ChannelClosed(f"session {self.id}: channel closed by this client")
        try:
            while True:
                try:
                    frame = await channel.receive()
                except ChannelClosed as exc:
                    error = exc
                    return
                if isinstance(frame, m.Message):
                    await self._route(frame)
                else:
                    self._on_event(frame)
        finally:
            self._channel = None
            self._end(error)
            with trio.CancelScope(shield=True):
                await channel.aclose()

    async def _route(self, msg: m.Message) -> None:
        self.recent_messages.append(msg)
        comm_id = msg.content.get("comm_id")
        if comm_id is not None and comm_id in self._comms:
            comm = self._comms[comm_id]
            try:
                comm._send.send_nowait(msg)
            except trio.WouldBlock:
                self.dropped += 1
        waiter = self._waiters.get(msg.parent_id or "")
        if waiter is not None:
            try:
                await waiter.send(msg)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._waiters.pop(msg.parent_id or "", None)

    def _on_event(self, event: m.KernelEvent) -> None:
        self.recent_events.append(event)
        if isinstance(event, m.OutputEvent):
            self.kernel_output.append((event.stream, event.text))
        elif isinstance(event, m.ClientDisconnected):
            self._evicted = True
        elif isinstance(event, m.ExitedEvent):
            self.exit_code = event.exit_code
            self.client._nursery.start_soon(self._confirm_exit, event.exit_code)
        elif isinstance(event, (m.FramesLost, m.SupervisorRestarted)) and not event.history:
            # Frames may be missing from what the running executions collect.
            for stream in self._streams.values():
                stream.notices.append(event)
            if self.on_notice is not None:
                self.on_notice(event)
        for sub in list(self._subscribers):
            try:
                sub.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(sub)

    async def _confirm_exit(self, exit_code: int) -> None:
        """Fail the pending requests if the kernel is still gone. An `exited` event can be
        old news: frames produced while no client was attached (a restart's) are handed to
        the next client (docs/protocol.md §4.6), and a restarted kernel answers requests."""
        with trio.move_on_after(self._timeout(None, "request")):
            try:
                status = (await self.client.session_info(self.id)).status
            except ClientError:
                status = "exited"
            if status == "exited":
                self._fail_waiters(KernelDied(
                    f"session {self.id}: the kernel exited (code {exit_code})",
                    exit_code=exit_code, output=self.kernel_output_text()))

    def _fail_waiters(self, error: ClientError) -> None:
        """Ends every pending request with `error` (the channel stays open)."""
        self._failure = error
        waiters, self._waiters = self._waiters, {}
        for send in waiters.values():
            send.close()

    def _end(self, error: ClientError) -> None:
        self._fail_waiters(error)
        for sub in self._subscribers:
            sub.close()
        self._subscribers.clear()
        self._closed_event.set()

    def _failure_for(self, what: str) -> ClientError:
        failure = self._failure or ChannelClosed(f"session {self.id}: channel closed")
        if isinstance(failure, KernelDied):
            return KernelDied(f"{failure.args[0].splitlines()[0]} while waiting for {what}",
                              exit_code=failure.exit_code, output=failure.output)
        if isinstance(failure, ResumeFailed):
            return ResumeFailed(f"{failure} (waiting for {what})", attempts=failure.attempts,
                                cause=failure.cause)
        if isinstance(failure, ChannelClosed):
            return ChannelClosed(f"{failure} (waiting for {what})", evicted=failure.evicted)
        return failure

    async def close(self) -> None:
        """Let go of the channel (the kernel keeps running)."""
        channel = self._channel
        if channel is not None:
            await channel.aclose()
            with trio.move_on_after(5):
                await self._closed_event.wait()

    # ---- sending -------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """Send one Jupyter message in relay form (`messages.request` builds one)."""
        await self.attach()
        channel = self._channel
        if channel is None:
            raise self._failure_for(message["header"]["msg_type"])
        await channel.send_text(json.dumps(message))

    @asynccontextmanager
    async def request(self, message: dict[str, Any]
                      ) -> AsyncIterator[trio.MemoryReceiveChannel[m.Message]]:
        """Send `message` and yield the queue of the messages answering it."""
        await self.attach()
        msg_id = message["header"]["msg_id"]
        send, recv = trio.open_memory_channel[m.Message](REQUEST_QUEUE)
        self._failure = None
        self._waiters[msg_id] = send
        try:
            await self.send(message)
            yield recv
        finally:
            self._waiters.pop(msg_id, None)
            recv.close()

    async def call(self, msg_type: str, content: dict[str, Any], *, reply: str | None = None,
                   channel: str = "shell", timeout: float | None = None) -> m.Message:
        """Send a request and return its reply (default `<x>_reply` for `<x>_request`)."""
        reply = reply or msg_type.replace("_request", "_reply")
        timeout = self._timeout(timeout, "reply")
        message = m.request(msg_type, content, channel=channel)
        async with self.request(message) as recv:
            with trio.move_on_after(timeout):
                while True:
                    try:
                        msg = await recv.receive()
                    except trio.EndOfChannel:
                        raise self._failure_for(msg_type) from None
                    if msg.msg_type == reply:
                        return msg
        raise ClientTimeout(f"session {self.id}: no {reply} to {msg_type} "
                            f"{message['header']['msg_id']} within {timeout:g} s")

    # ---- executing -----------------------------------------------------------------------

    @asynccontextmanager
    async def stream(self, code: str, *, timeout: float | None = None,
                     input: InputHandler | Iterable[str] | None = None,
                     silent: bool = False, store_history: bool = True,
                     stop_on_error: bool = True) -> AsyncIterator[ExecutionStream]:
        """Run code; yields an ExecutionStream of its messages (async-iterate it), which
        ends once the execution is done. `input`: a callback `(prompt, password) -> str` or a
        list of answers for `input()`."""
        handler = _input_handler(input)
        timeout = self._timeout(timeout, "execute")
        content = m.execute_content(code, silent=silent, store_history=store_history,
                                    allow_stdin=handler is not None,
                                    stop_on_error=stop_on_error)
        message = m.request("execute_request", content)
        self.last_code = code
        msg_id = message["header"]["msg_id"]
        async with self.request(message) as recv:
            stream = self._streams[msg_id] = ExecutionStream(self, msg_id, code, recv, timeout,
                                                             handler)
            try:
                yield stream
            finally:
                self._streams.pop(msg_id, None)

    async def execute(self, code: str, *, timeout: float | None = None,
                      input: InputHandler | Iterable[str] | None = None,
                      silent: bool = False, store_history: bool = True,
                      stop_on_error: bool = True,
                      interrupt_on_timeout: bool = True,
                      on_message: Callable[[m.Message], object] | None = None,
                      ) -> ExecutionResult:
        """Run code and return what it produced. A kernel error is in `result.error` (call
        `result.raise_for_error()` to raise it). On timeout the kernel is interrupted (unless
        told not to) and ExecutionTimeout carries the partial result."""
        async with self.stream(code, timeout=timeout, input=input, silent=silent,
                               store_history=store_history,
                               stop_on_error=stop_on_error) as messages:
            try:
                async for msg in messages:
                    if on_message is not None:
                        on_message(msg)
            except ExecutionTimeout as exc:
                if interrupt_on_timeout:
                    await self._interrupt_and_drain(messages, on_message)
                    exc.partial = messages.result()
                self.last_result = exc.partial
                raise
            except InputNotAnswered:
                await self._interrupt_and_drain(messages, on_message)
                raise
            return messages.result()

    async def _interrupt_and_drain(self, messages: ExecutionStream,
                                   on_message: Callable[[m.Message], object] | None) -> None:
        """Interrupt the kernel and let the request end (briefly): a request sent while the
        interrupted one is still running would be aborted by the kernel (stop_on_error)."""
        with trio.move_on_after(self._timeout(None, "request")):
            await self.interrupt()
        messages.extend_deadline(self._timeout(None, "interrupted"))
        try:
            async for msg in messages:
                if on_message is not None:
                    on_message(msg)
        except (ExecutionTimeout, InputNotAnswered):
            pass

    async def kernel_info(self, timeout: float | None = None) -> dict[str, Any]:
        return (await self.call("kernel_info_request", {}, timeout=timeout)).content

    async def complete(self, code: str, cursor_pos: int | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """complete_reply content: `matches`, `cursor_start`, `cursor_end`, ..."""
        pos = len(code) if cursor_pos is None else cursor_pos
        reply = await self.call("complete_request", {"code": code, "cursor_pos": pos},
                                timeout=timeout)
        return reply.content

    async def inspect(self, code: str, cursor_pos: int | None = None, detail_level: int = 0,
                      timeout: float | None = None) -> dict[str, Any]:
        """inspect_reply content: `found`, `data` (a mime bundle), ..."""
        pos = len(code) if cursor_pos is None else cursor_pos
        reply = await self.call("inspect_request", {"code": code, "cursor_pos": pos,
                                                    "detail_level": detail_level},
                                timeout=timeout)
        return reply.content

    async def is_complete(self, code: str, timeout: float | None = None) -> dict[str, Any]:
        """is_complete_reply content: `status` (complete, incomplete, invalid, unknown),
        `indent` when incomplete."""
        return (await self.call("is_complete_request", {"code": code}, timeout=timeout)).content

    # ---- comms ---------------------------------------------------------------------------

    async def comm_open(self, target_name: str, data: dict[str, Any] | None = None,
                        comm_id: str | None = None) -> Comm:
        comm = Comm(self, comm_id or m.new_msg_id(), target_name)
        self._comms[comm.comm_id] = comm
        await self.send(m.request("comm_open", {"comm_id": comm.comm_id,
                                                "target_name": target_name,
                                                "data": data or {}}))
        return comm

    # ---- events --------------------------------------------------------------------------

    @asynccontextmanager
    async def events(self) -> AsyncIterator[trio.MemoryReceiveChannel[m.KernelEvent]]:
        """Kernel events from now on, as typed objects (messages.StatusEvent, ...)."""
        await self.attach()
        send, recv = trio.open_memory_channel[m.KernelEvent](SUBSCRIBER_QUEUE)
        self._subscribers.append(send)
        try:
            yield recv
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            recv.close()

    async def wait_for_event(self, predicate: Callable[[m.KernelEvent], bool], *,
                             what: str, timeout: float | None = None,
                             after: Callable[[], Awaitable[object]] | None = None,
                             ) -> m.KernelEvent:
        """The first event from now on that satisfies predicate; `what` names it in the
        timeout's message. `after` (e.g. `session.kill`) runs once listening has begun, so
        the event it causes cannot be missed."""
        timeout = self._timeout(timeout, "reply")
        async with self.events() as events:
            with trio.move_on_after(timeout):
                if after is not None:
                    await after()
                async for event in events:
                    if predicate(event):
                        return event
                raise self._failure_for(what)
        raise ClientTimeout(f"session {self.id}: no {what} within {timeout:g} s")

    def kernel_output_text(self) -> str:
        """The kernel process's recent stdout/stderr lines (its `output` events)."""
        return "".join(text for _, text in self.kernel_output)

    def diagnostics(self) -> str:
        """What a failure report shows: the kernel's own output and the last messages."""
        lines = [f"session {self.id}"
                 + (f" (kernel exited with code {self.exit_code})"
                    if self.exit_code is not None else "")]
        output = self.kernel_output_text()
        lines.append("--- kernel process output (last lines) ---")
        lines.append(output.rstrip() if output else "(none)")
        if self.last_result is not None:
            result = self.last_result
            lines.append(f"--- last execution ({result.status}) ---")
            lines.append((self.last_code or "").rstrip())
            lines.append("--- its stdout ---")
            lines.append(result.stdout.rstrip() or "(none)")
            lines.append("--- its stderr ---")
            lines.append(result.stderr.rstrip() or "(none)")
            if result.error is not None:
                lines.append(f"--- its error: {result.error.ename}: {result.error.evalue} ---")
                lines += [_strip_ansi(line) for line in result.error.traceback]
        lines.append("--- last messages ---")
        lines += [msg.summary() for msg in self.recent_messages] or ["(none)"]
        lines.append("--- last events (output events: above) ---")
        lines += [repr(event) for event in self.recent_events
                  if not isinstance(event, m.OutputEvent)] or ["(none)"]
        return "\n".join(lines)

    # ---- lifecycle (HTTP) ----------------------------------------------------------------

    async def info(self) -> ActiveSession:
        return await self.client.session_info(self.id)

    async def interrupt(self) -> None:
        await self.client.interrupt(self.id)

    async def restart(self, *, working_directory: str | None = None,
                      timeout: float | None = None) -> None:
        await self.client.restart(self.id, working_directory=working_directory,
                                  timeout=timeout)

    async def kill(self) -> None:
        await self.client.kill(self.id)

    async def delete(self) -> None:
        await self.client.delete(self.id)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop the kernel (kill) if it runs, wait for it to exit, and remove the session."""
        await self.client.remove_session(self.id, timeout=timeout)
