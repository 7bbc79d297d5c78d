"""One attach to a session's channel, across the connections that carry it.

The channel is a WebSocket (TCP, or the session's own Unix socket on the socket transport).
Where the daemon numbers its frames (docs/durability.md, "Resuming a client connection exactly
where it stopped"), a lost connection is replaced without the caller noticing: the reader
reconnects with `resume=<last frame processed>` and the daemon sends exactly what followed.
Where it does not (the reference Kallichore ignores the query), a lost connection ends the
channel, as it always did. The decisions are `resume.ResumeState`'s; this module does the I/O:
one reader (the session's task calling `receive`), any number of senders, and `ack_loop`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from kallichore_trio.client import messages as m
from kallichore_trio.client.discovery import ServerAddress
from kallichore_trio.client.errors import (
    AuthError,
    ChannelClosed,
    ClientError,
    ResumeFailed,
    SessionNotFound,
)
from kallichore_trio.client.resume import (
    ReconnectPlan,
    ResumeState,
    Verdict,
    ack_frame,
    retryable_refusal,
    take_seq,
)
from kallichore_trio.client.websocket import HandshakeRejected, WebSocket, WebSocketClosed

log = logging.getLogger(__name__)

EVICTED = "another client took the session's channel"


class Channel:
    def __init__(self, session_id: str, address: ServerAddress,
                 socket_path: Callable[[], Awaitable[str]], *, ask_resume: bool,
                 reconnect_timeout: float) -> None:
        self.session_id = session_id
        self._address = address
        self._socket_path = socket_path
        self._ask_resume = ask_resume
        self._reconnect_timeout = reconnect_timeout
        self.state = ResumeState()
        #: Connections replaced without the caller noticing.
        self.reconnects = 0
        self._ws: WebSocket | None = None
        self._ended: ChannelClosed | None = None
        self._closing = False
        self._replaced = trio.Event()  # set (and renewed) when _ws changes or the channel ends
        self._ack_wake = trio.Event()
        self._reconnect_scope: trio.CancelScope | None = None

    # ---- connecting ----------------------------------------------------------------------

    async def connect(self) -> None:
        """The first connection; the errors say why the daemon refused it."""
        try:
            self._ws = await self._open()
        except HandshakeRejected as exc:
            if exc.status == 401:
                raise AuthError(f"session {self.session_id}: the daemon refused the token"
                                ) from None
            if b"KS-1" in exc.body or exc.status == 404:
                raise SessionNotFound(f"session {self.session_id}: no such session",
                                      status=404, code="KS-1") from None
            raise ChannelClosed(f"session {self.session_id}: channel refused: {exc}") from None
        except OSError as exc:
            raise ChannelClosed(f"session {self.session_id}: cannot connect to the daemon at "
                                f"{self._address.describe()}: {exc}") from None
        except WebSocketClosed as exc:
            raise ChannelClosed(f"session {self.session_id}: {exc}") from None
        self.state.connected()

    async def _open(self) -> WebSocket:
        """One connection, asking to resume from `state.last` (unless told not to ask)."""
        address = self._address
        query = f"?{self.state.query()}" if self._ask_resume else ""
        if address.uds is None:
            host, _, port = address.base_url.split("://", 1)[1].partition(":")
            stream: trio.abc.Stream = await trio.open_tcp_stream(
                host, int(port.split("/")[0] or 80))
            target = f"/sessions/{self.session_id}/channels{query}"
            host_header = f"{host}:{port}"
        else:
            # The socket transport: the session's own Unix socket (docs/protocol.md §1.3),
            # asked for each time (a daemon that took the session over has its own).
            stream = await trio.open_unix_socket(await self._socket_path())
            target = f"/api/channels/{self.session_id}{query}"
            host_header = "localhost"
        try:
            return await WebSocket.connect(stream, target, host=host_header,
                                           token=address.token)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    async def _reconnect(self, why: WebSocketClosed) -> None:
        """Replace a lost connection, or end the channel with ResumeFailed."""
        plan = ReconnectPlan(deadline=trio.current_time() + self._reconnect_timeout)
        cause: BaseException = why
        log.info("session %s: channel lost (%s); resuming after frame %d", self.session_id,
                 why, self.state.last)
        with trio.CancelScope(deadline=plan.deadline) as scope:
            self._reconnect_scope = scope
            while not self._closing and (delay := plan.next_delay(trio.current_time())
                                         ) is not None:
                await trio.sleep(delay)
                try:
                    ws = await self._open()
                except HandshakeRejected as exc:
                    cause = exc
                    if retryable_refusal(exc.status):
                        continue
                    break
                except (SessionNotFound, AuthError) as exc:
                    cause = exc  # the socket path was refused: another attempt would be too
                    break
                except (OSError, WebSocketClosed, ClientError) as exc:
                    cause = exc
                    continue
                self._ws = ws
                self.state.connected()
                self.reconnects += 1
                self._signal_replaced()
                log.info("session %s: channel resumed after frame %d (attempt %d)",
                         self.session_id, self.state.last, plan.attempts)
                return
        self._reconnect_scope = None
        if self._closing:
            self._end(ChannelClosed(f"session {self.session_id}: channel closed by this "
                                    "client"))
        else:
            self._end(ResumeFailed(
                f"session {self.session_id}: the channel broke ({why}) and could not be "
                f"resumed: {plan.attempts} attempts in {self._reconnect_timeout:g} s, the last "
                f"failed with: {cause}", attempts=plan.attempts, cause=cause))
        raise self._ended  # type: ignore[misc]

    # ---- receiving -----------------------------------------------------------------------

    async def receive(self) -> m.Message | m.KernelEvent:
        """The next frame of the session, in order, each once, across lost connections;
        ChannelClosed (ResumeFailed when reconnecting failed) once the channel ended."""
        while True:
            ws = self._ws
            if ws is None:
                raise self._ended or ChannelClosed(f"session {self.session_id}: channel closed")
            try:
                text = await ws.receive_text()
            except WebSocketClosed as exc:
                await self._lost(ws, exc)
                continue
            try:
                obj = m.load_frame(text)
            except m.FrameError:
                continue
            seq = take_seq(obj)
            verdict = self.state.on_frame(seq, obj, trio.current_time())
            if verdict is Verdict.DUPLICATE:
                continue
            if self.state.take_wake():
                self._ack_wake.set()
            try:
                frame = m.parse_object(obj)
            except m.FrameError:
                continue
            if verdict is Verdict.HISTORY and isinstance(frame, (m.FramesLost,
                                                                 m.SupervisorRestarted)):
                frame = attrs.evolve(frame, history=True)
            return frame

    async def _lost(self, ws: WebSocket, why: WebSocketClosed) -> None:
        with trio.CancelScope(shield=True):
            await ws.aclose()
        if self._closing or not self.state.resumable:
            detail = EVICTED if self.state.evicted else str(why)
            self._end(ChannelClosed(f"session {self.session_id}: channel closed: {detail}",
                                    evicted=self.state.evicted))
            raise self._ended  # type: ignore[misc]
        await self._reconnect(why)

    # ---- sending -------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one frame; while a lost connection is being replaced, on the new one."""
        while True:
            ws = self._ws
            if ws is None:
                raise self._ended or ChannelClosed(f"session {self.session_id}: channel closed")
            replaced = self._replaced
            try:
                await ws.send_text(text)
                return
            except WebSocketClosed as exc:
                if self._closing or not self.state.resumable:
                    raise ChannelClosed(f"session {self.session_id}: {exc}") from None
            # The reader sees the same break and replaces the connection (or ends the
            # channel): a frame that failed to go out whole was not taken by the daemon.
            if self._ws is ws:
                with trio.move_on_after(self._reconnect_timeout + 1):
                    await replaced.wait()
                if self._ws is ws:
                    raise ChannelClosed(f"session {self.session_id}: the channel broke and "
                                        "was not replaced in time")

    async def ack_loop(self) -> None:
        """Acknowledge what was processed: every ACK_EVERY_FRAMES frames or ACK_AFTER_SECONDS
        after the first frame not yet acknowledged (resume.py). Ends with the channel."""
        while self._ended is None:
            with trio.move_on_at(self.state.ack_at()):
                await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            seq = self.state.ack_due(trio.current_time())
            ws = self._ws
            if seq is not None and ws is not None:
                try:
                    await ws.send_text(ack_frame(seq))
                except WebSocketClosed:
                    continue  # the reader replaces the connection, which resets the acks
                self.state.ack_sent(seq, trio.current_time())

    # ---- ending --------------------------------------------------------------------------

    def _signal_replaced(self) -> None:
        replaced, self._replaced = self._replaced, trio.Event()
        replaced.set()
        self._ack_wake.set()

    def _end(self, error: ChannelClosed) -> None:
        self._ended = self._ended or error
        self._ws = None
        self._signal_replaced()

    async def aclose(self) -> None:
        """Acknowledge what was processed (so the daemon keeps nothing for this client) and
        close; the reader then ends."""
        self._closing = True
        if self._reconnect_scope is not None:
            self._reconnect_scope.cancel()
        ws = self._ws
        if ws is None:
            return
        seq = self.state.final_ack()
        if seq is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await ws.send_text(ack_frame(seq))
                    self.state.ack_sent(seq, trio.current_time())
                except WebSocketClosed:
                    pass
        await ws.aclose()

    async def abort_connection(self) -> None:
        """Break the current connection as a network failure would (a reset on TCP): where
        the daemon numbers frames the channel resumes on a new connection. For tests."""
        ws = self._ws
        if ws is not None:
            await ws.abort()

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def last_seq(self) -> int:
        return self.state.last

    def __repr__(self) -> str:
        return (f"<Channel {self.session_id!r} last={self.state.last} "
                f"numbered={self.state.numbered} reconnects={self.reconnects}>")

