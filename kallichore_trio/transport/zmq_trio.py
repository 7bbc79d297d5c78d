"""Trio adapter for pyzmq sockets: one owner task per socket.

Why this is subtle
------------------
``sock.FD`` is not the data socket. It is libzmq's internal mailbox signaller and it is
*edge-like*: it turns readable when commands (a message arrived, the peer drained its queue, ...)
are queued for the socket, and it is reset whenever *any* zmq call on the socket processes those
commands -- ``send``, ``recv``, ``getsockopt(EVENTS)``, ``setsockopt(SUBSCRIBE)`` and more. So:

* messages may already be readable while the FD is not (someone else's call consumed the edge);
* a ``send`` can consume the edge that a pending receive was sleeping on, and nothing wakes the
  receiver again until the *next* message arrives (a lost wake-up: a hang);
* one FD serves both directions (write readiness is also signalled as FD readability).

The only safe pattern is: re-read ``zmq.EVENTS`` after every zmq call, act on it, and sleep on the
FD only when EVENTS says there is nothing to do -- with no checkpoint between that last EVENTS
read and the sleep. That in turn means one task drives a socket: the *owner*. Every other task
talks to it through two bounded Trio memory channels, with one exception for sends:

* ``await sock.send(frames)`` / ``sock.send_nowait(frames)``: if nothing is queued, the calling
  task hands the message to zmq itself, and only if zmq refuses it (Again) does it queue (a
  request's hop to the owner is on the round trip's critical path). This is safe because Trio
  runs one task at a time, so the owner is suspended in a checkpoint or in its FD wait, and
  because the sender re-reads EVENTS after its send and wakes a sleeping owner if zmq has a
  message for it: that send may have consumed the very edge the owner sleeps on. Otherwise ->
  outbound channel -> owner sends
  with ``NOBLOCK``; on ``zmq.Again`` it keeps the message (and the frame it stopped at) and
  retries when EVENTS reports POLLOUT. A full outbound channel is backpressure on the producers.
* owner ``recv_multipart(NOBLOCK)`` -> inbound channel -> ``await sock.receive()`` /
  ``async for frames in sock``. When the inbound channel is full the owner holds one message and
  stops receiving, so libzmq buffers (up to RCVHWM, after which DEALER/ROUTER push back on the peer
  and PUB drops, by zmq's rules). Nothing is dropped here.

Producers (and consumers, when the owner is waiting for room) wake a sleeping owner by
cancelling the cancel scope it sleeps in. The sleep also has a safety timeout (``tick``, 0.5 s),
so a missed edge would cost at most 1.5 ticks, never a hang; such recoveries are counted in
``statistics().missed_wakeups`` (expected to stay 0). The timeout falls on a multiple of the
tick (`timers.next_multiple`), so that the ticks of all idle sockets cost one scheduler round.

Lifetime and errors
-------------------
``open_socket`` / ``wrap_socket`` are async context managers that run the owner in their own
nursery. Closing (``aclose()`` or leaving the block) marks the socket closed, calls
``trio.lowlevel.notify_closing(fd)`` and closes the zmq socket, with no checkpoint in between.
Messages still in the outbound channel are discarded; those already handed to zmq obey LINGER.

* After close, ``send``/``send_nowait``/``receive``/``receive_nowait`` raise
  ``trio.ClosedResourceError`` (tasks blocked in them at that moment get it too).
* A ``ZMQError`` other than ``Again`` is not swallowed: it ends the owner, which cancels the
  ``async with`` body, and it is raised out of the context manager (unwrapped from the nursery's
  ExceptionGroup when it is the only error). Tasks outside the body blocked in ``receive`` see
  ``trio.EndOfChannel`` (after any buffered messages) and blocked senders see
  ``trio.BrokenResourceError``.

Tested on Linux only; on Windows ``wait_readable`` takes the signaller's SOCKET handle, which
should work but is untested. libzmq sets TCP_NODELAY on its TCP sockets itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import zmq

from kallichore_trio.timers import next_multiple

__all__ = [
    "SocketStatistics",
    "Subscription",
    "TrioSocket",
    "open_socket",
    "open_subscription",
    "round_trip",
    "wrap_socket",
]

Frames = list[bytes]

# Plain ints: pyzmq's enum flags cost ~1 us per operation on the hot path.
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
_NOBLOCK, _SNDMORE, _EVENTS = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.EVENTS)


@attrs.frozen
class SocketStatistics:
    messages_sent: int  # handed to zmq
    messages_received: int  # taken from zmq
    pending_outbound: int  # accepted by send() but not yet handed to zmq
    pending_inbound: int  # taken from zmq but not yet receive()d
    missed_wakeups: int  # safety-timeout ticks that found work (a lost FD edge)


def _send_from(zsock: zmq.Socket[Any], msg: Frames, pos: int) -> int:
    """Send the frames of `msg` from `pos` on, without blocking; return how far zmq took
    them (len(msg) once all of it is sent, less where zmq said Again)."""
    last = len(msg) - 1
    try:
        while pos <= last:
            zsock.send(msg[pos], _NOBLOCK | (_SNDMORE if pos < last else 0))
            pos += 1
    except zmq.Again:
        pass
    return pos


def _recv_message(zsock: zmq.Socket[Any]) -> Frames:
    """recv_multipart without its per-frame getsockopt(RCVMORE) (an enum lookup in pyzmq):
    a zmq.Frame knows whether more parts follow. The rest of a multipart message is always
    there once its first part is, so NOBLOCK never fails after the first."""
    frame = zsock.recv(_NOBLOCK, copy=False)
    parts = [frame.bytes]
    while frame.more:
        frame = zsock.recv(_NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


class TrioSocket:
    """One zmq socket driven by one owner task. Create it with `open_socket`/`wrap_socket`."""

    def __init__(
        self,
        zsock: zmq.Socket[Any],
        *,
        name: str = "",
        inbound_size: int = 1000,
        outbound_size: int = 1000,
        tick: float = 0.5,
    ) -> None:
        if inbound_size < 1 or outbound_size < 1:
            raise ValueError("channel sizes must be >= 1 (the owner never blocks on a channel)")
        self.name = name
        self.zmq_socket = zsock  # for inspection only (e.g. .closed); never do I/O on it
        self.socket_type = zmq.SocketType(zsock.get(zmq.TYPE))
        self.last_endpoint: str = zsock.get(zmq.LAST_ENDPOINT).decode()
        self._fd: int = zsock.get(zmq.FD)
        self._tick = tick
        self._out_send, self._out_recv = trio.open_memory_channel[Frames](outbound_size)
        self._in_send, self._in_recv = trio.open_memory_channel[Frames](inbound_size)
        self._held_out: Frames | None = None  # taken from the channel, not fully sent
        self._out_pos = 0  # next frame of _held_out to send
        self._held_in: Frames | None = None  # received, waiting for room in the channel
        # zmq said Again this round despite EVENTS: don't treat that direction as ready (no spin)
        self._recv_again = False
        self._send_again = False
        # REQ and REP strictly alternate: a second recv before a send is an error, not Again.
        self._one_per_drain = zsock.type in (zmq.REQ, zmq.REP)
        self._wait_scope: trio.CancelScope | None = None
        self._woken = False
        self._owner_scope = trio.CancelScope()
        self._closed = False
        self._sent = 0
        self._received = 0
        self._missed = 0

    # -- public API (any task) -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message: at once if zmq takes it, else queue it for the owner
        (blocking while the outbound channel is full). Always a checkpoint."""
        msg = self._checked(frames)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._send_direct(msg):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await self._out_send.send(msg)
        self._wake()

    def send_nowait(self, frames: Sequence[bytes]) -> None:
        """Send or queue one multipart message; trio.WouldBlock if it must queue and the
        channel is full."""
        msg = self._checked(frames)
        if not self._send_direct(msg):
            self._out_send.send_nowait(msg)
            self._wake()

    async def receive(self) -> Frames:
        """The next multipart message, in arrival order."""
        if self._closed:
            raise trio.ClosedResourceError(f"{self!r} is closed")
        msg = await self._in_recv.receive()
        if self._held_in is not None:
            self._wake()  # the owner is waiting for room
        return msg

    def receive_nowait(self) -> Frames:
        if self._closed:
            raise trio.ClosedResourceError(f"{self!r} is closed")
        msg = self._in_recv.receive_nowait()
        if self._held_in is not None:
            self._wake()
        return msg

    def __aiter__(self) -> TrioSocket:
        return self

    async def __anext__(self) -> Frames:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Close now (idempotent); always a checkpoint, even if already closed."""
        self._close_now()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> SocketStatistics:
        return SocketStatistics(
            messages_sent=self._sent,
            messages_received=self._received,
            pending_outbound=self._out_send.statistics().current_buffer_used
            + (self._held_out is not None),
            pending_inbound=self._in_send.statistics().current_buffer_used
            + (self._held_in is not None),
            missed_wakeups=self._missed,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TrioSocket {self.name!r} {self.socket_type.name} {state}>"

    # -- internals -----------------------------------------------------------------------

    def _checked(self, frames: Sequence[bytes]) -> Frames:
        if self._closed:
            raise trio.ClosedResourceError(f"{self!r} is closed")
        if not frames:
            raise ValueError("a zmq message needs at least one frame")
        return list(frames)

    def _send_direct(self, msg: Frames) -> bool:
        """Hand `msg` to zmq from the calling task, saving the hop to the owner (a request's
        way to the kernel is the round trip's critical path). Only when nothing is queued
        ahead of it, so order holds, and only if zmq takes it (no Again). The send may have
        processed the command that set the FD the owner sleeps on (the lost wake-up of the
        module doc), so EVENTS is read again after it and the owner woken if zmq has
        something for it. True if zmq has the message (or its first frames: the owner
        finishes it)."""
        if self._held_out is not None or self._out_queued():
            return False
        pos = _send_from(self.zmq_socket, msg, 0)
        if pos == 0:
            return False
        if pos < len(msg):
            # libzmq accepts the rest of a multipart message once it took the first frame;
            # should it not, the owner resumes where this stopped.
            self._held_out, self._out_pos = msg, pos
            self._wake()
            return True
        self._sent += 1
        if self._wait_scope is not None and self._events() & _POLLIN:
            self._wake()
        return True

    def _out_queued(self) -> bool:
        stats = self._out_send.statistics()  # senders blocked on a full channel count too
        return bool(stats.current_buffer_used or stats.tasks_waiting_send)

    def _wake(self) -> None:
        if self._wait_scope is not None:
            self._woken = True
            self._wait_scope.cancel()

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out_send.close()  # blocked senders -> ClosedResourceError
        self._in_recv.close()  # blocked receivers -> ClosedResourceError
        self._owner_scope.cancel()
        trio.lowlevel.notify_closing(self._fd)  # no checkpoint between this and close()
        self.zmq_socket.close()  # uses the socket's LINGER

    def _events(self) -> int:
        return int(self.zmq_socket.getsockopt(_EVENTS))

    def _drain(self) -> bool:
        """Move messages zmq -> inbound channel while EVENTS says POLLIN and there is room."""
        progressed = False
        if self._held_in is not None:
            try:
                self._in_send.send_nowait(self._held_in)
            except trio.WouldBlock:
                return False
            self._held_in = None
            progressed = True
        if not self._events() & _POLLIN:
            return progressed
        first = True
        # Once EVENTS said POLLIN, receive until zmq.Again rather than re-reading EVENTS before
        # each message: one getsockopt fewer per message. The caller re-reads EVENTS before
        # any sleep, so a message arriving after the Again is not missed.
        while True:
            try:
                msg = _recv_message(self.zmq_socket)
            except zmq.Again:
                self._recv_again = first  # EVENTS said POLLIN and recv disagreed: spurious
                break
            first = False
            self._received += 1
            progressed = True
            try:
                self._in_send.send_nowait(msg)
            except trio.WouldBlock:
                self._held_in = msg
                break
            if self._one_per_drain:
                break
        return progressed

    def _flush(self) -> bool:
        """Move messages outbound channel -> zmq while EVENTS says POLLOUT."""
        progressed = False
        while True:
            if self._held_out is None:
                try:
                    self._held_out = self._out_recv.receive_nowait()
                except trio.WouldBlock:
                    return progressed
                self._out_pos = 0
            if self._out_pos == 0 and not self._events() & _POLLOUT:
                return progressed
            self._out_pos = _send_from(self.zmq_socket, self._held_out, self._out_pos)
            if self._out_pos < len(self._held_out):
                # Again: resume at _out_pos, so even a mid-message Again is safe
                self._send_again = True
                return progressed
            self._held_out = None
            self._sent += 1
            progressed = True

    def _ready(self) -> bool:
        """Fresh EVENTS read: is there zmq work we could do right now?"""
        ev = self._events()  # always read: a send may just have consumed a receive edge
        return bool(
            (self._held_in is None and not self._recv_again and ev & _POLLIN)
            or (self._held_out is not None and not self._send_again and ev & _POLLOUT)
        )

    async def _wait(self) -> bool:
        """Sleep until the FD signals, a task wakes us, or the tick; True if the tick expired."""
        want_fd = self._held_in is None or self._held_out is not None
        self._woken = False
        with trio.move_on_at(next_multiple(self._tick)) as scope:
            self._wait_scope = scope
            try:
                if want_fd:
                    await trio.lowlevel.wait_readable(self._fd)
                else:  # inbound full, nothing to send: only a consumer (or tick) can help
                    await trio.sleep_forever()
            finally:
                self._wait_scope = None
        return scope.cancelled_caught and not self._woken

    async def _run(self) -> None:
        timed_out = False
        try:
            with self._owner_scope:
                while not self._closed:
                    self._recv_again = self._send_again = False
                    progressed = self._drain() | self._flush()  # both, every round
                    ready = self._ready()
                    if progressed or ready:
                        if timed_out:
                            self._missed += 1
                        timed_out = False
                    if ready:
                        await trio.lowlevel.checkpoint()  # more to do, but others go first
                    else:
                        # Straight to sleep after progress too: EVENTS was just read, and the
                        # FD wait is a checkpoint (an extra yield here would cost a task step
                        # per message and delay the consumer's wake-up by a scheduler round).
                        timed_out = await self._wait()
        except trio.ClosedResourceError:
            if not self._closed:  # notify_closing by someone else? not ours to hide
                raise
        finally:
            self._in_send.close()  # receivers outside the body: EndOfChannel after the buffer
            self._out_recv.close()  # blocked senders: BrokenResourceError


@asynccontextmanager
async def wrap_socket(
    zsock: zmq.Socket[Any],
    *,
    name: str = "",
    inbound_size: int = 1000,
    outbound_size: int = 1000,
    tick: float = 0.5,
) -> AsyncIterator[TrioSocket]:
    """Drive an existing, configured zmq socket; it is closed on exit. Hands it over: do not
    touch `zsock` yourself afterwards."""
    try:
        sock = TrioSocket(
            zsock, name=name, inbound_size=inbound_size, outbound_size=outbound_size, tick=tick
        )
    except BaseException:
        zsock.close(linger=0)
        raise
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sock._run, name=f"zmq owner {sock!r}")
            try:
                yield sock
            finally:
                sock._close_now()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]  # raise the single error as itself, keeping its own chain
        context, suppress = exc.__context__, exc.__suppress_context__
        try:
            raise exc
        finally:
            exc.__context__, exc.__suppress_context__ = context, suppress
    finally:
        sock._close_now()


def _new_socket(
    ctx: zmq.Context[Any],
    socket_type: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    subscribe: bytes | Sequence[bytes] | None = None,
    linger: int = 0,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    options: Mapping[int, int | bytes] | None = None,
) -> zmq.Socket[Any]:
    """A configured zmq socket; options are set before bind/connect (so a SUB is subscribed
    before it connects). Closed again if any step fails."""
    if subscribe is not None and socket_type != zmq.SUB:
        raise ValueError("subscribe is only for SUB sockets")
    zsock: zmq.Socket[Any] = ctx.socket(socket_type)
    try:
        zsock.setsockopt(zmq.LINGER, linger)
        if sndhwm is not None:
            zsock.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm is not None:
            zsock.setsockopt(zmq.RCVHWM, rcvhwm)
        if identity is not None:
            zsock.setsockopt(zmq.IDENTITY, identity)
        for option, value in (options or {}).items():
            zsock.setsockopt(option, value)
        topics = [subscribe] if isinstance(subscribe, bytes) else list(subscribe or [])
        for topic in topics:
            zsock.setsockopt(zmq.SUBSCRIBE, topic)
        if bind is not None:
            zsock.bind(bind)
        if connect is not None:
            zsock.connect(connect)
    except BaseException:
        zsock.close(linger=0)
        raise
    return zsock


@asynccontextmanager
async def open_socket(
    ctx: zmq.Context[Any],
    socket_type: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    subscribe: bytes | Sequence[bytes] | None = None,
    linger: int = 0,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    options: Mapping[int, int | bytes] | None = None,
    name: str = "",
    inbound_size: int = 1000,
    outbound_size: int = 1000,
    tick: float = 0.5,
    handshake: trio.Event | None = None,
) -> AsyncIterator[TrioSocket]:
    """Create, configure, bind and/or connect a socket and drive it.

    Options are set before bind/connect (so a SUB is subscribed before it connects). A SUB with
    no `subscribe` receives nothing. With `bind="tcp://127.0.0.1:0"` the chosen address is
    `sock.last_endpoint`. `handshake`, if given, is set once a connection has completed its
    ZMTP handshake: from then on the peer knows this socket's identity (a ROUTER drops what it
    sends to an identity it does not know yet)."""
    zsock = _new_socket(ctx, socket_type, bind=bind, identity=identity, subscribe=subscribe,
                        linger=linger, sndhwm=sndhwm, rcvhwm=rcvhwm, options=options)
    monitor: zmq.Socket[Any] | None = None
    try:
        if handshake is not None:
            # Before connect, or the event could come before anyone listens for it.
            monitor = zsock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        if connect is not None:
            zsock.connect(connect)
    except BaseException:
        if monitor is not None:
            monitor.close(linger=0)
        zsock.close(linger=0)
        raise
    async with wrap_socket(
        zsock, name=name, inbound_size=inbound_size, outbound_size=outbound_size, tick=tick
    ) as sock:
        if monitor is None or handshake is None:
            yield sock
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signal_handshake, monitor, handshake, name)
            try:
                yield sock
            finally:
                nursery.cancel_scope.cancel()


async def _signal_handshake(monitor: zmq.Socket[Any], handshake: trio.Event, name: str) -> None:
    """Set `handshake` on the first completed ZMTP handshake of the monitored socket, then let
    the monitor go (the monitored socket drops its later events: nobody is at the other end)."""
    async with wrap_socket(monitor, name=f"{name} monitor", tick=5.0) as events:
        await events.receive()
    handshake.set()


async def round_trip(zsock: zmq.Socket[Any], frames: Sequence[bytes], timeout: float) -> bool:
    """Send one request on a REQ socket and wait for its reply; False if none came in time.

    For a socket that only the calling task ever touches (the heartbeat), so it needs no owner
    task: the caller is the owner, and the rule above holds (EVENTS read right before each sleep
    on the FD, nothing in between). Two scheduler steps per round trip instead of the seven an
    owner task and its channels cost, which is most of an idle daemon's CPU. After a timeout
    the REQ socket cannot send again (zmq's strict alternation): close it and make a new one.
    The caller closes the socket; call ``trio.lowlevel.notify_closing(fd)`` first.
    """
    fd = zsock.getsockopt(zmq.FD)
    last = len(frames) - 1
    with trio.move_on_after(timeout):
        while not zsock.getsockopt(_EVENTS) & _POLLOUT:
            await trio.lowlevel.wait_readable(fd)
        for i, frame in enumerate(frames):
            zsock.send(frame, _NOBLOCK | (_SNDMORE if i < last else 0))
        while not zsock.getsockopt(_EVENTS) & _POLLIN:
            await trio.lowlevel.wait_readable(fd)
        _recv_message(zsock)
        return True
    return False


class Subscription:
    """A SUB socket read by exactly one task, which is its owner: no owner task, no channel.

    The relay's iopub pump is the only user of its socket and SUB never sends, so the pump can
    drive libzmq itself and save a task switch and two channel operations per wake-up (measured:
    114 -> 106 us of daemon CPU per message when output trickles in one message at a time).
    `receive_batch` keeps the rule of the module doc: EVENTS is read right before each sleep.
    Calling it from two tasks at once is a bug (trio raises BusyResourceError on the FD wait).
    """

    def __init__(self, zsock: zmq.Socket[Any], *, name: str = "", tick: float = 0.5) -> None:
        self.zmq_socket = zsock
        self.name = name
        self._fd: int = zsock.get(zmq.FD)
        self._tick = tick
        self._closed = False
        self._received = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription {self.name!r} {state} received={self._received}>"

    async def receive_batch(self, limit: int = 256) -> list[Frames]:
        """Wait for messages; return those already queued (1 to `limit`), oldest first.
        Raises trio.ClosedResourceError once the subscription is closed."""
        zsock = self.zmq_socket
        slept = False
        while True:
            if self._closed:
                raise trio.ClosedResourceError(f"{self!r} is closed")
            batch: list[Frames] = []
            if zsock.getsockopt(_EVENTS) & _POLLIN:
                try:
                    while len(batch) < limit:
                        batch.append(_recv_message(zsock))
                except zmq.Again:
                    pass
                if batch:
                    self._received += len(batch)
                    if not slept:
                        # Messages were waiting: yield once, so a flood cannot starve the
                        # other tasks. After a sleep on the FD this call has checkpointed
                        # already, and a second yield would only delay the relay.
                        await trio.lowlevel.checkpoint()
                    return batch
            # Nothing to read: sleep on the FD. EVENTS was read just now, with no checkpoint
            # since, so a message arriving from here on sets the FD. After a spurious POLLIN
            # (recv said Again at once) EVENTS would say POLLIN again: sleep anyway, and the
            # tick bounds any edge that recv consumed.
            with trio.move_on_at(next_multiple(self._tick)):
                await trio.lowlevel.wait_readable(self._fd)
            slept = True

    def close(self) -> None:
        """Close now; a task in receive_batch gets ClosedResourceError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._fd)  # no checkpoint between this and close()
        self.zmq_socket.close()


@asynccontextmanager
async def open_subscription(
    ctx: zmq.Context[Any],
    connect: str,
    *,
    topics: Sequence[bytes] = (b"",),
    rcvhwm: int | None = None,
    name: str = "",
    tick: float = 0.5,
) -> AsyncIterator[Subscription]:
    """A connected SUB socket, subscribed to `topics` before connecting; closed on exit."""
    zsock = _new_socket(ctx, zmq.SUB, connect=connect, subscribe=list(topics), rcvhwm=rcvhwm)
    sub = Subscription(zsock, name=name, tick=tick)
    try:
        yield sub
    finally:
        sub.close()
