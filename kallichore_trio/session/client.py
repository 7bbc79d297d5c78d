"""One attached client of a session, and the session's own Unix listener (socket transport).

A `ClientChannel` serves one client connection (either transport gives a `ClientConnection`)
with three tasks:

    reader      client frames -> parse_client_frame -> host.deliver (the session)
    writer      host.outbox -> the socket, in order, a batch per write; a frame is released
                only once written, so what a client did not get goes to the next one; for a
                resuming client (`resume=N`) only once the client acknowledged it, and every
                frame carries its sequence number (docs/durability.md)
    keepalive   pings, and drops a client that stops answering or whose write is stuck

The session creates one per client connection; `serve` attaches it (evicting the client
attached before: one at a time, the newest wins) and detaches it when it ends. Its interface
to the session is narrow (`ClientHost`): deliver a message, the outbox, the attached-client
slot, and its id for the logs. The session tells it when frames were added (`wake`) and, for a
client that does not resume, waits on it for backpressure (`wait_caught_up`). A resuming
client never holds the kernel back: what the outbox cannot keep is reported as `framesLost`.

`SessionSocket` is the per-session Unix socket clients connect through on the socket
transport: bound on the first request for it, kept until the session ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import attrs
import trio

from kallichore_trio import wire
from kallichore_trio.config import Config
from kallichore_trio.core.outbox import Lost, Outbox
from kallichore_trio.security import Refusal, session_socket_check
from kallichore_trio.transport.unix import FileIdentity, file_identity, serve_unix_socket
from kallichore_trio.transport.websocket import ClientConnection, ClientGone, WsprotoConnection

log = logging.getLogger(__name__)

EVICTED_REASON = "Another client is connecting to this session."
#: A client that does not resume holds the kernel back once this far behind (or half the
#: outbox, if smaller): the figure the relay was tuned with before resuming raised the bound.
NOT_RESUMING_HIGH_WATER = 10_000
#: A batch this long is written without lingering for more.
_LINGER_UNTIL_FRAMES = 64


class ClientHost(Protocol):
    """What a ClientChannel needs of its session."""

    session_id: str
    outbox: Outbox
    #: The attached client: the channel attaches itself here, and detaches when it ends.
    client: ClientChannel | None

    async def deliver(self, msg: wire.ClientMessage) -> None: ...

    def on_activity(self) -> None:
        """A client attached (the idle-shutdown timer starts again)."""


class ClientChannel:
    def __init__(self, conn: ClientConnection, host: ClientHost, *, config: Config,
                 socket_path: str | None = None, resume: int | None = None) -> None:
        self.conn = conn
        self.host = host
        self.outbox = host.outbox
        self.config = config
        #: The per-session Unix socket the client came through (None on TCP).
        self.socket_path = socket_path
        #: A resuming client: the number of the last frame written to it (its cursor); None
        #: for a client that did not ask to resume.
        self.cursor = resume
        #: Past this many frames in the outbox the kernel's iopub pump waits (wait_caught_up);
        #: never for a resuming client.
        self.high_water = max(1, min(config.outbox.max_frames // 2, NOT_RESUMING_HIGH_WATER))
        self.evicted = False
        self.done = trio.Event()
        self.pings_sent = 0
        #: When the write in progress began (trio clock), or None between writes.
        self.write_started: float | None = None
        self._scope = trio.CancelScope()
        self._changed = trio.Event()
        self._linger: trio.CancelScope | None = None  # the writer holding output back
        self._room = trio.Event()
        self._finished = False
        #: Notices for a client that does not resume, written before the next batch.
        self._notices: list[str] = []

    def __repr__(self) -> str:
        return (f"<ClientChannel session={self.host.session_id!r} evicted={self.evicted} "
                f"cursor={self.cursor} pings={self.pings_sent}>")

    @property
    def holds_back(self) -> bool:
        """The kernel's iopub pump should wait for this client (`wait_caught_up`): a client
        that does not resume is behind by more than the high-water mark."""
        return self.cursor is None and len(self.outbox) > self.high_water

    # ---- from the session ----------------------------------------------------------------

    def wake(self) -> None:
        """Frames were added to the outbox. An urgent one (a status, a reply) ends the
        writer's linger: what is pending is written now."""
        if self._linger is not None and not self._can_wait():
            self._linger.cancel()
        self._changed.set()

    async def wait_caught_up(self) -> None:
        """Until the writer brought the outbox down to the high-water mark, or the client is
        gone (the caller checks again which client is attached)."""
        if self._finished:
            return
        self._room = trio.Event()
        await self._room.wait()

    async def serve(self) -> None:
        """Attach to the host, evicting the client attached before (one client at a time: the
        newest wins); serve until the client leaves, is dropped or is evicted; detach."""
        host = self.host
        previous = host.client
        host.client = self
        host.on_activity()
        if previous is not None:
            await previous.evict()
        if self.cursor is not None:
            # What the client processed is released; the rest is resent from its cursor.
            self.cursor = min(self.cursor, self.outbox.last_seq)
            self.outbox.ack(self.cursor)
        log.info("session %s: client connected%s", host.session_id,
                 "" if self.cursor is None else f" (resuming after frame {self.cursor})")
        try:
            await self._run()
        finally:
            if host.client is self:
                host.client = None
            await self._finish()

    async def _run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._keepalive)
                await self._writer()
                nursery.cancel_scope.cancel()

    async def _finish(self) -> None:
        """Once detached: wake a pump waiting on this client, tell an evicted client why,
        close the connection."""
        self._finished = True
        self._room.set()
        self.done.set()
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            if self.evicted:
                try:
                    await self.conn.send_text(wire.client_disconnected_event(EVICTED_REASON))
                except ClientGone:
                    pass
            await self.conn.close()
        log.info("session %s: client %s", self.host.session_id,
                 "evicted" if self.evicted else "disconnected")

    async def evict(self) -> None:
        """A newer client takes over: let the writer finish the frame it is sending, then cut
        it off."""
        self.evicted = True
        self._changed.set()
        with trio.move_on_after(2.0):
            await self.done.wait()
        self._scope.cancel()
        with trio.move_on_after(2.0):
            await self.done.wait()

    # ---- tasks -----------------------------------------------------------------------------

    def _can_wait(self) -> bool:
        """Only output is pending: it may wait for more output to join it in one write."""
        if self.cursor is None:
            return self.outbox.can_wait
        return self.outbox.last_urgent <= self.cursor

    async def _writer(self) -> None:
        """Outbox -> client, in order, a batch per socket write. The write timeout is enforced
        by `_keepalive`, which aborts the connection under a stuck write (a cancel scope
        cannot: Hypercorn shields its writes)."""
        while not self.evicted:
            batch, end = self._next_batch()
            if not batch and not self._notices:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            if batch and self._can_wait() and len(batch) < _LINGER_UNTIL_FRAMES:
                # Only output so far: let more join it (see Config.output_linger).
                with trio.move_on_after(self.config.output_linger) as self._linger:
                    await trio.sleep_forever()
                self._linger = None
                batch, end = self._next_batch()
            if self._notices:
                batch[:0] = self._notices
                self._notices = []
            self.write_started = trio.current_time()
            try:
                await self.conn.send_texts(batch)
            except ClientGone:
                return
            finally:
                self.write_started = None
            if self.cursor is None:
                self.outbox.ack(end)
                if len(self.outbox) <= self.high_water:
                    self._room.set()
            else:
                self.cursor = end

    def _next_batch(self) -> tuple[list[str], int]:
        """The next frames to write (empty: none) and the number of the last one they cover
        (the cursor to move to, or what to release once written)."""
        if self.cursor is not None:
            read = self.outbox.read_after(self.cursor)
            return ([wire.frames_lost_event(item.first, item.last) if isinstance(item, Lost)
                     else wire.with_seq(*item) for item in read.items], read.cursor)
        batch = self.outbox.read()
        if batch.missed:
            log.warning("session %s: the outbox overflowed; %d frames were dropped",
                        self.host.session_id, batch.missed)
            # Tell the user, through an event Positron shows in the kernel's output.
            self._notices.append(wire.output_event("stderr", (
                f"[kallichore-trio] {batch.missed} output frames were dropped while no "
                "client was reading\n")))
        return ([text for _, text in batch.frames],
                batch.frames[-1][0] if batch.frames else -1)

    async def _reader(self) -> None:
        try:
            while (text := await self.conn.receive_text()) is not None:
                try:
                    msg = wire.parse_client_frame(text)
                except wire.ClientFrameError as exc:
                    log.warning("session %s: dropped a client frame: %s",
                                self.host.session_id, exc)
                    continue
                if isinstance(msg, wire.Ack):
                    if self.cursor is not None:  # only what this connection was sent
                        self.outbox.ack(min(msg.seq, self.cursor))
                    continue
                await self.host.deliver(msg)
        except ClientGone:
            pass
        self._scope.cancel()

    async def _keepalive(self) -> None:
        """Ping every period with an 8-byte counter. A client is dropped when more than 3 pings
        are unanswered or a write has been stuck for the write timeout."""
        period = self.config.timeouts.client_ping
        write_timeout = self.config.timeouts.client_write
        tick = min(period, write_timeout)
        next_ping = trio.current_time() + period  # the first Ping one period after connecting
        while True:
            await trio.sleep(tick)
            last = self.conn.last_pong
            answered = int.from_bytes(last, "big") if last and len(last) == 8 else 0
            started = self.write_started
            now = trio.current_time()
            if self.pings_sent - answered > 3:
                reason = f"{self.pings_sent - answered} pings unanswered"
            elif started is not None and now - started > write_timeout:
                reason = f"a write blocked for over {write_timeout:g} s"
            else:
                if now >= next_ping:
                    next_ping = now + period
                    self.pings_sent += 1
                    # The Ping waits behind a stuck write; it is then one more unanswered.
                    with trio.move_on_after(tick):
                        try:
                            await self.conn.ping(self.pings_sent.to_bytes(8, "big"))
                        except ClientGone:
                            self._scope.cancel()
                            return
                continue
            log.warning("session %s: lost connection with client (%s)",
                        self.host.session_id, reason)
            await self.conn.abort()
            self._scope.cancel()
            return


@attrs.frozen
class _Bound:
    """A listening Unix socket, and the scope that ends it."""

    path: Path
    identity: FileIdentity | None
    scope: trio.CancelScope

    def intact(self) -> bool:
        """Is the file at `path` still the one our listener is bound to? (Something outside
        the daemon, a temp-dir cleaner say, may have removed it.)"""
        return self.identity is not None and file_identity(self.path) == self.identity


class SessionSocket:
    """A session's Unix socket for clients (socket transport)."""

    def __init__(self, session_id: str, config: Config,
                 serve: Callable[[ClientConnection, str, int | None], Awaitable[None]]) -> None:
        self.session_id = session_id
        self.config = config
        self._serve = serve
        self._bound: _Bound | None = None
        self._lock = trio.Lock()

    async def path(self, new_path: Callable[[], Path],
                   live_nursery: Callable[[], trio.Nursery]) -> Path:
        """The socket's path. The first call binds it at `new_path()` in the nursery
        `live_nursery()` returns (the session's: it raises SessionNotFound once the session is
        closing); it then listens until the session ends, and every later call returns the
        same path. Asking again therefore disturbs nobody: a connected client is evicted only
        when a new one connects, and no listener is ever torn down or re-bound under a client
        that is about to connect. Only if the file has gone is a new socket bound, at a new
        path. Raises what `new_path` raises (SocketPathTooLong) and OSError if the bind fails.
        """
        async with self._lock:
            nursery = live_nursery()
            current = self._bound
            if current is not None and current.intact():
                return current.path
            if current is not None:
                log.warning("session %s: socket %s has gone; binding a new one",
                            self.session_id, current.path)
                current.scope.cancel()
                self._bound = None
            path = new_path()
            scope = trio.CancelScope()
            await nursery.start(self._listen, path, scope)
            self._bound = _Bound(path, file_identity(path), scope)
            return path

    async def _listen(self, path: Path, scope: trio.CancelScope, *,
                      task_status: trio.TaskStatus[Path]) -> None:
        async def serve(conn: WsprotoConnection) -> None:
            # The target was checked before the upgrade was accepted (_check_resume).
            await self._serve(conn, str(path), wire.resume_from_target(conn.target))

        with scope:
            await serve_unix_socket(
                path, serve, authorize=session_socket_check(self.config),
                check_target=_check_resume,
                handshake_timeout=self.config.timeouts.socket_handshake, task_status=task_status)


def _check_resume(target: bytes) -> Refusal | None:
    """A per-session socket's upgrade request may ask to resume (`?resume=N`)."""
    try:
        wire.resume_from_target(target)
    except wire.ResumeError as exc:
        return Refusal(400, str(exc))
    return None
