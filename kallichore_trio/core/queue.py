"""The execution queue: execute_requests wait here while the kernel runs another. Pure.

The reference advances the queue on *any* idle status (docs/protocol.md §6.5); we advance
only when the active request ends (its execute_reply or its idle status, whichever comes first),
so a comm message finishing in the middle of a long cell does not release the next cell early,
and a lost iopub status cannot stall the queue. See docs/differences.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from kallichore_trio.wire import ClientMessage


class QueueFull(Exception):
    """More execute_requests are waiting than the queue holds."""


@attrs.define
class ExecutionQueue:
    capacity: int = 10_000
    active: ClientMessage | None = None
    pending: deque[ClientMessage] = attrs.field(factory=deque)
    #: Told of the requests `clear` lets go of (so that whoever follows them can stop).
    on_dropped: Callable[[list[ClientMessage]], None] = lambda dropped: None

    def submit(self, request: ClientMessage) -> bool:
        """Take an execute_request; True if it should be sent now, False if it was queued."""
        if self.active is None:
            self.active = request
            return True
        if len(self.pending) >= self.capacity:
            raise QueueFull(f"{len(self.pending)} execute_requests are already waiting")
        self.pending.append(request)
        return False

    def finished(self, parent_msg_id: str | None) -> ClientMessage | None:
        """The request `parent_msg_id` ended; return the request to send next, if any."""
        if self.active is None or parent_msg_id != self.active.msg_id:
            return None
        self.active = self.pending.popleft() if self.pending else None
        return self.active

    def clear(self) -> list[ClientMessage]:
        """Drop everything (interrupt, shutdown, exit); return what was dropped."""
        dropped = ([self.active] if self.active is not None else []) + list(self.pending)
        self.active = None
        self.pending.clear()
        if dropped:
            self.on_dropped(dropped)
        return dropped

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "length": len(self.pending),
            "pending": [m.relay_dict() for m in self.pending],
        }
        if self.active is not None:
            body["active"] = self.active.relay_dict()
        return body


class HeldMessages:
    """Client messages held while no kernel is running, for the next one, in order. Bounded:
    past `limit` the oldest is dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._messages: deque[ClientMessage] = deque()

    def __len__(self) -> int:
        return len(self._messages)

    def hold(self, msg: ClientMessage) -> ClientMessage | None:
        """Keep `msg`; return the message dropped to make room, if any."""
        dropped = self._messages.popleft() if len(self._messages) >= self.limit else None
        self._messages.append(msg)
        return dropped

    def pop(self) -> ClientMessage:
        return self._messages.popleft()
