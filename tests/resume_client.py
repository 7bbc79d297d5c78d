"""A raw resuming channels client (docs/durability.md, "Resuming a client connection"), for the
resume tests (tests/integration/test_resume.py) and the soak (bench/soak_resume.py).

Deliberately not kallichore_trio.client: the tests must see the wire exactly (the text of each
frame, where `seq` sits), and break connections in ways a well-behaved client never would.

- `ResumeSocket`: one WebSocket connection over TCP or a Unix socket, driven by wsproto, with
  three ways to end it: a clean close, an abrupt TCP reset (SO_LINGER 0, then close), and a
  close in the middle of a frame.
- `ResumeTracker`: pure bookkeeping of what a resuming client processed: the last sequence
  number, duplicates, gaps, `framesLost` ranges, the flood kernel's indices
  (tests/kernels/mini_kernel.py, mode `flood`).
- `FloodRun`: drives a flood kernel through many disconnects, with a window of outstanding
  requests so that the kernel never publishes more than the outbox keeps (see its docstring).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
import wsproto
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

#: How long one read may wait for the daemon before the run is declared stuck.
READ_TIMEOUT = 60.0


class UpgradeRefused(Exception):
    """The daemon answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused: {status} {body[:200]!r}")
        self.status = status
        self.body = body


def channels_target(session_id: str, resume: int | str | None, *, unix: bool = False) -> str:
    """The upgrade request's target: on TCP the API route, on a session's Unix socket any path
    (we use Kallichore's); `resume` goes in the query as it is given (tests send bad values)."""
    path = f"/api/channels/{session_id}" if unix else f"/sessions/{session_id}/channels"
    return path if resume is None else f"{path}?resume={resume}"


class ResumeSocket:
    """One channels WebSocket: text frames in, text frames out, Pings answered."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.closed = False
        self._parts: list[str] = []

    @classmethod
    async def open_tcp(cls, host: str, port: int, target: str, token: str | None,
                       first: list[str] | None = None) -> ResumeSocket:
        with trio.fail_after(READ_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
        return await cls._upgrade(stream, target, token, first)

    @classmethod
    async def open_unix(cls, path: str, target: str, token: str | None,
                        first: list[str] | None = None) -> ResumeSocket:
        with trio.fail_after(READ_TIMEOUT):
            stream = await trio.open_unix_socket(path)
        return await cls._upgrade(stream, target, token, first)

    @classmethod
    async def _upgrade(cls, stream: trio.abc.Stream, target: str, token: str | None,
                       first: list[str] | None) -> ResumeSocket:
        """Upgrade; frames that arrive with the answer are appended to `first`."""
        self = cls(stream)
        headers = [] if token is None else [("Authorization", f"Bearer {token}")]
        try:
            with trio.fail_after(READ_TIMEOUT):
                await stream.send_all(self.ws.send(Request(host="localhost", target=target,
                                                           extra_headers=headers)))
                rejected: RejectConnection | None = None
                body = bytearray()
                accepted = False
                while not accepted:
                    data = await stream.receive_some(65536)
                    if not data:
                        if rejected is not None:
                            raise UpgradeRefused(rejected.status_code, bytes(body))
                        raise ConnectionError("the daemon closed during the upgrade")
                    self.ws.receive_data(data)
                    for event in self.ws.events():
                        if isinstance(event, AcceptConnection):
                            accepted = True
                        elif isinstance(event, RejectConnection):
                            rejected = event
                            if not event.has_body:
                                raise UpgradeRefused(event.status_code, b"")
                        elif isinstance(event, RejectData):
                            body.extend(event.data)
                            if event.body_finished:
                                assert rejected is not None
                                raise UpgradeRefused(rejected.status_code, bytes(body))
                        else:
                            texts = await self._handle(event)
                            if first is not None:
                                first.extend(texts)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return self

    async def _handle(self, event: Any) -> list[str]:
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
            if event.message_finished:
                text = "".join(self._parts)
                self._parts = []
                return [text]
        elif isinstance(event, Ping):
            await self.stream.send_all(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.closed = True
        return []

    async def receive(self, timeout: float = READ_TIMEOUT) -> list[str] | None:
        """The text frames one read brought (possibly none); None once the daemon closed."""
        if self.closed:
            return None
        with trio.fail_after(timeout):
            try:
                data = await self.stream.receive_some(262144)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
        if not data:
            self.closed = True
            return None
        self.ws.receive_data(data)
        texts: list[str] = []
        for event in self.ws.events():
            texts += await self._handle(event)
        return texts

    async def receive_one(self, pending: list[str], timeout: float = READ_TIMEOUT) -> str:
        """The next frame (from `pending` first, which reads refill)."""
        with trio.fail_after(timeout):
            while not pending:
                texts = await self.receive(timeout)
                if texts is None:
                    raise ConnectionError("the daemon closed the connection")
                pending.extend(texts)
        return pending.pop(0)

    async def send_text(self, text: str) -> None:
        with trio.fail_after(READ_TIMEOUT):
            await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message))

    async def ack(self, seq: int) -> None:
        await self.send_text(ack_text(seq))

    # ---- three ways to go --------------------------------------------------------------

    async def close_clean(self) -> list[str]:
        """A WebSocket close handshake; the frames that arrived meanwhile (not processed)."""
        unread: list[str] = []
        try:
            with trio.fail_after(READ_TIMEOUT):
                await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
                while (texts := await self.receive()) is not None:
                    unread += texts
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)
        return unread

    async def close_reset(self) -> None:
        """An abrupt end: with SO_LINGER 0 the close sends a TCP RST (on a Unix socket it is
        a plain close), and whatever the daemon had in flight is lost."""
        sock = getattr(self.stream, "socket", None)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(self.stream)

    async def close_mid_frame(self, seq: int) -> None:
        """Half of an ack frame, then the end of the stream: the daemon reads a frame that
        never finishes."""
        data = self.ws.send(TextMessage(data=ack_text(seq)))
        try:
            with trio.fail_after(READ_TIMEOUT):
                await self.stream.send_all(data[: len(data) // 2])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(self.stream)


def ack_text(seq: int) -> str:
    return json.dumps({"kind": "ack", "seq": seq})


# ---- what the client processed ----------------------------------------------------------


def seq_of(text: str) -> int | None:
    """The frame's `seq`, which must be its first field when present."""
    if not text.startswith('{"seq":'):
        return None
    return int(text[7:text.index(",", 7)])


@attrs.define
class ResumeTracker:
    """What a resuming client has processed, and everything that broke the protocol's
    promises (`violations`). `keep` keeps every processed frame (small tests)."""

    keep: bool = False
    processed: int = 0  # the last seq processed: the N of the next resume=N
    max_seen: int = 0  # the highest seq received, processed or not
    frames: int = 0  # seq frames processed
    duplicates: int = 0  # seq <= processed arriving again: never allowed
    resent: int = 0  # received before a break, not processed, received again after it
    lost_ranges: list[tuple[int, int]] = attrs.field(factory=list)
    restarts: list[dict[str, Any]] = attrs.field(factory=list)
    #: Numbers a supervisorRestarted jumped over (what the dead daemon may have used).
    restart_gaps: list[tuple[int, int]] = attrs.field(factory=list)
    next_index: int = 0  # the flood kernel's next expected index
    index_gaps: list[tuple[int, int, bool]] = attrs.field(factory=list)  # first, last, explained
    duplicate_indices: int = 0
    violations: list[str] = attrs.field(factory=list)
    items: list[tuple[int | None, dict[str, Any]]] = attrs.field(factory=list)
    idle_parents: set[str] = attrs.field(factory=set)
    _explained: bool = False  # a framesLost or restart since the last index

    def discarded(self, texts: list[str]) -> None:
        """Frames received but dropped unprocessed at a break: they are to come again."""
        for text in texts:
            seq = seq_of(text)
            if seq is not None:
                self.max_seen = max(self.max_seen, seq)

    def process(self, text: str) -> dict[str, Any]:
        frame = json.loads(text)
        seq = seq_of(text)
        if self.keep:
            self.items.append((seq, frame))
        if seq is None:
            self._notice(frame, text)
            return frame
        if seq <= self.processed:
            self.duplicates += 1
            self.violations.append(f"seq {seq} again after {self.processed}")
            return frame
        if seq <= self.max_seen:
            self.resent += 1
        self.max_seen = max(self.max_seen, seq)
        restarted = frame.get("kind") == "kernel" and "supervisorRestarted" in frame
        if restarted:
            self.restarts.append({"seq": seq, "after": self.processed,
                                  **frame["supervisorRestarted"]})
            if seq > self.processed + 1:
                self.restart_gaps.append((self.processed + 1, seq - 1))
            self._explained = True
        elif seq != self.processed + 1:
            self.violations.append(f"seq {seq} after {self.processed} with no framesLost")
        self.processed = seq
        self.frames += 1
        if frame.get("kind") == "jupyter":
            self._jupyter(frame)
        return frame

    def _notice(self, frame: dict[str, Any], text: str) -> None:
        lost = frame.get("framesLost") if frame.get("kind") == "kernel" else None
        if lost is None:
            if not (frame.get("kind") == "kernel" and "clientDisconnected" in frame):
                self.violations.append(f"a frame without seq: {text[:120]}")
            return
        first, last = lost["first"], lost["last"]
        self.lost_ranges.append((first, last))
        self._explained = True
        if first > last:
            self.violations.append(f"framesLost {first}..{last} is empty")
        if first == self.processed + 1:
            self.processed = last
        elif not any(first == a and last <= b for a, b in self.restart_gaps):
            # The one place a range may lie below `processed`: right after a restart, the
            # numbers supervisorRestarted jumped over.
            self.violations.append(f"framesLost {first}..{last} after {self.processed}")

    def _jupyter(self, frame: dict[str, Any]) -> None:
        msg_type = frame["header"]["msg_type"]
        if msg_type == "stream":
            index = int(frame["content"]["text"])
            if index < self.next_index:
                self.duplicate_indices += 1
                self.violations.append(f"index {index} again (expected {self.next_index})")
                return
            if index > self.next_index:
                self.index_gaps.append((self.next_index, index - 1, self._explained))
                if not self._explained:
                    self.violations.append(
                        f"indices {self.next_index}..{index - 1} missing, nothing said why")
            self.next_index = index + 1
            self._explained = False
        elif msg_type == "status" and frame["content"].get("execution_state") == "idle":
            parent = frame.get("parent_header") or {}
            if parent.get("msg_id"):
                self.idle_parents.add(parent["msg_id"])

    def lost_frames(self) -> int:
        return sum(b - a + 1 for a, b in self.lost_ranges)


# ---- the flood, through disconnects -------------------------------------------------------


def execute_message(code: str, msg_id: str) -> dict[str, Any]:
    return {
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "resume-test",
                   "username": "someone", "date": "2026-01-01T00:00:00.000Z",
                   "version": "5.3"},
        "parent_header": None,
        "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": False},
        "metadata": {},
        "buffers": [],
    }


BREAK_KINDS = ("clean", "reset", "mid_frame")

Connect = Callable[[int], Awaitable[tuple[ResumeSocket, list[str]]]]


@attrs.define
class FloodRun:
    """A flood of `total` indices from a flood kernel, received through `breaks` disconnects.

    The client asks for the indices in chunks of `chunk` (one execute_request each) and keeps at
    most `window` chunks outstanding. Why not one request for everything: a resuming client's
    session reads the kernel whatever the client does (docs/durability.md, Bounds), so a kernel
    publishing faster than the client reads would overflow any outbox on a busy machine, and
    "no framesLost" would be a race. With the window the outbox never holds more than
    window x chunk stream frames plus what is unacknowledged, whatever the scheduling.

    `connect(resume)` opens a resuming connection (and returns the frames that came with the
    upgrade answer). At break number i in `kills` the run calls `on_kill(i)` instead (the soak
    kills the daemon there and starts another) and reconnects after it.
    """

    total: int
    chunk: int
    window: int
    rng: random.Random
    connect: Connect
    breaks: list[int]  # processed-frame counts at which to break, ascending
    tracker: ResumeTracker = attrs.field(factory=ResumeTracker)
    kills: set[int] = attrs.field(factory=set)
    on_kill: Callable[[int], Awaitable[None]] | None = None
    break_counts: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(BREAK_KINDS, 0))
    acks: int = 0
    connections: int = 0
    closed_by_daemon: int = 0
    _requests: dict[int, list[str]] = attrs.field(factory=dict)  # chunk -> its msg_ids
    _next_chunk: int = 0

    @property
    def chunks(self) -> int:
        return -(-self.total // self.chunk)

    def _done(self, k: int) -> bool:
        return any(m in self.tracker.idle_parents for m in self._requests.get(k, ()))

    def _outstanding(self) -> list[int]:
        return [k for k in range(self._next_chunk) if not self._done(k)]

    def finished(self) -> bool:
        return self._next_chunk == self.chunks and not self._outstanding()

    async def _request(self, ws: ResumeSocket, k: int) -> None:
        msg_id = uuid.uuid4().hex
        self._requests.setdefault(k, []).append(msg_id)
        first = k * self.chunk
        code = json.dumps({"first": first, "count": min(self.chunk, self.total - first)})
        await ws.send_json(execute_message(code, msg_id))

    async def _top_up(self, ws: ResumeSocket) -> None:
        while self._next_chunk < self.chunks and len(self._outstanding()) < self.window:
            self._next_chunk += 1
            await self._request(ws, self._next_chunk - 1)

    async def run(self) -> None:
        tracker = self.tracker
        breaks = list(self.breaks)
        break_no = 0
        while True:
            if self.connections > len(breaks) + 20:
                raise AssertionError(f"{self.connections} connections for {len(breaks)} "
                                     "breaks: the daemon keeps closing them")
            ws, pending = await self.connect(tracker.processed)
            self.connections += 1
            # Requests sent on a connection that then broke may never have arrived: send
            # every unfinished one again (the kernel publishes an index only once).
            for k in self._outstanding():
                await self._request(ws, k)
            await self._top_up(ws)
            ack_every = self.rng.randint(100, 500)
            unacked = 0
            broke = False
            while not broke:
                if self.finished():
                    await ws.ack(tracker.processed)
                    self.acks += 1
                    await ws.close_clean()
                    return
                if not pending:
                    texts = await ws.receive()
                    if texts is None:
                        self.closed_by_daemon += 1
                        break
                    pending = texts
                    continue
                if break_no < len(breaks) and tracker.frames >= breaks[break_no]:
                    tracker.discarded(pending)
                    if break_no in self.kills:
                        # The daemon dies under the connection; then the dead socket goes.
                        assert self.on_kill is not None
                        await self.on_kill(break_no)
                        await trio.aclose_forcefully(ws.stream)
                    else:
                        await self._break(ws, pending)
                    break_no += 1
                    broke = True
                    continue
                text = pending.pop(0)
                before = len(tracker.idle_parents)
                tracker.process(text)
                unacked += 1
                if unacked >= ack_every:
                    await ws.ack(tracker.processed)
                    self.acks += 1
                    unacked = 0
                if len(tracker.idle_parents) != before:
                    await self._top_up(ws)

    async def _break(self, ws: ResumeSocket, pending: list[str]) -> None:
        kind = self.rng.choice(BREAK_KINDS)
        self.break_counts[kind] += 1
        if kind != "mid_frame" and self.rng.random() < 0.5:
            await ws.ack(self.tracker.processed)
            self.acks += 1
        if kind == "clean":
            self.tracker.discarded(await ws.close_clean())
        elif kind == "reset":
            await ws.close_reset()
        else:
            await ws.close_mid_frame(self.tracker.processed)
        pending.clear()


def break_points(rng: random.Random, count: int, frames: int) -> list[int]:
    """`count` distinct processed-frame counts in [1, frames), ascending."""
    return sorted(rng.sample(range(1, frames), count))
