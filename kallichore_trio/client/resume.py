"""Resuming a session's channel, sans-IO (docs/durability.md, "Resuming a client connection
exactly where it stopped"; docs/client.md, "Resuming a broken channel").

`ResumeState` is one attach's view of the session's numbered stream: what the client processed
(`last`, sent as `resume=last` when it reconnects), whether the daemon numbers its frames at
all (a daemon without the protocol, such as the reference Kallichore, ignores the query and
sends no `seq`: then nothing here applies and the channel behaves as it always did), when an ack
is due, and what each frame is (a new frame, a duplicate, a loss notice, an eviction).
`ReconnectPlan` spaces the attempts to reconnect and says when to give up. Pure: no I/O, no
clock of its own (the caller passes `now`).
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any

import attrs

#: Ack after this many frames processed since the last ack...
ACK_EVERY_FRAMES = 256
#: ... or this many seconds after the first frame processed since the last ack.
ACK_AFTER_SECONDS = 0.1

#: The daemon refuses `resume` values outside 0 .. 2^63 - 1 (docs/durability.md).
MAX_SEQ = 2**63 - 1


class Verdict(enum.Enum):
    """What the client does with one frame."""

    DELIVER = "deliver"  # a frame of the session's stream (or a notice): route it
    DUPLICATE = "duplicate"  # numbered at or below what was processed: drop it
    #: A notice about the time before this client attached (the frames other clients were
    #: sent, a crash before it came): route it, but it is no loss of this client's.
    HISTORY = "history"


def take_seq(frame: dict[str, Any]) -> int | None:
    """Remove the frame's `seq` and return it; None when it has none (or not an integer, which
    a daemon of the protocol never sends: the frame is then treated as unnumbered)."""
    seq = frame.pop("seq", None)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= MAX_SEQ:
        return None
    return seq


def kernel_notice(frame: dict[str, Any]) -> str | None:
    """The event name of a `{"kind": "kernel", "<name>": ...}` frame, else None."""
    if frame.get("kind") != "kernel":
        return None
    names = [key for key in frame if key != "kind"]
    return names[0] if len(names) == 1 else None


def ack_frame(seq: int) -> str:
    return json.dumps({"kind": "ack", "seq": seq})


@attrs.define
class ResumeState:
    #: The number of the last frame processed (or the end of the last range reported lost):
    #: what `resume=` says on the next connection.
    last: int = 0
    #: True once a numbered frame came (the daemon speaks the protocol), False once an
    #: unnumbered frame of the session's stream came, None before either.
    numbered: bool | None = None
    #: Evicted by another client (its `clientDisconnected` notice came): never reconnect.
    evicted: bool = False
    #: The first frame this attach processed: losses below it, and a supervisorRestarted
    #: before it, are about the time before the client attached (`resume=0` asks for the
    #: session's whole stream), not losses of its own.
    first: int | None = None
    acked: int = 0
    unacked_frames: int = 0
    unacked_since: float | None = None
    #: The ack timer moved (the first frame since an ack, or enough frames for one).
    wake: bool = False

    # ---- connecting ----------------------------------------------------------------------

    def query(self) -> str:
        return f"resume={self.last}"

    def connected(self) -> None:
        """A new connection was accepted with `resume=last`: the daemon released up to `last`,
        so there is nothing to ack yet."""
        self.acked = self.last
        self.unacked_frames = 0
        self.unacked_since = None

    @property
    def resumable(self) -> bool:
        """A lost connection can be resumed transparently."""
        return self.numbered is True and not self.evicted

    # ---- frames --------------------------------------------------------------------------

    def on_frame(self, seq: int | None, frame: dict[str, Any], now: float) -> Verdict:
        """Account for one frame (its `seq` already taken out with `take_seq`)."""
        if seq is not None:
            self.numbered = True
            if seq <= self.last:
                return Verdict.DUPLICATE
            self.last = seq
            self._processed(now)
            if self.first is None:
                self.first = seq
                if kernel_notice(frame) == "supervisorRestarted":
                    return Verdict.HISTORY
            return Verdict.DELIVER
        notice = kernel_notice(frame)
        if notice == "framesLost":
            lost_to = _range_end(frame["framesLost"])
            if lost_to is None:
                return Verdict.DELIVER
            if lost_to > self.last:
                # Nothing below lost_to will come: resuming from there avoids hearing of
                # the same loss twice after another break.
                self.last = lost_to
                self._processed(now)
            if self.first is None or lost_to < self.first:
                return Verdict.HISTORY
            return Verdict.DELIVER
        if notice == "clientDisconnected":
            self.evicted = True
            return Verdict.DELIVER
        if self.numbered is None:
            self.numbered = False
        return Verdict.DELIVER

    # ---- acks ----------------------------------------------------------------------------

    def _processed(self, now: float) -> None:
        self.unacked_frames += 1
        if self.unacked_since is None:
            self.unacked_since = now
            self.wake = True
        if self.unacked_frames == ACK_EVERY_FRAMES:
            self.wake = True

    def take_wake(self) -> bool:
        """Whether the task that sends acks must look at `ack_at` again (once per change)."""
        wake, self.wake = self.wake, False
        return wake

    def ack_at(self) -> float:
        """When the next ack is due: -inf now, inf when nothing waits for one."""
        if self.numbered is not True or self.last <= self.acked:
            return math.inf
        if self.unacked_frames >= ACK_EVERY_FRAMES:
            return -math.inf
        assert self.unacked_since is not None
        return self.unacked_since + ACK_AFTER_SECONDS

    def ack_due(self, now: float) -> int | None:
        """The seq to ack now, or None."""
        return self.last if now >= self.ack_at() else None

    def final_ack(self) -> int | None:
        """The seq to ack before closing on purpose, or None."""
        return self.last if self.numbered is True and self.last > self.acked else None

    def ack_sent(self, seq: int, now: float) -> None:
        """An ack of `seq` went out; frames processed meanwhile wait for the next one."""
        self.acked = max(self.acked, seq)
        self.unacked_frames = 0
        self.unacked_since = None if self.acked >= self.last else now


def _range_end(value: Any) -> int | None:
    if not isinstance(value, dict):
        return None
    last = value.get("last")
    return last if isinstance(last, int) and not isinstance(last, bool) else None


# ---- reconnecting ----------------------------------------------------------------------------

#: The first retry is immediate (a reset connection to a live daemon), then the delay doubles
#: from FIRST_DELAY up to MAX_DELAY.
FIRST_DELAY = 0.05
MAX_DELAY = 1.0
MAX_ATTEMPTS = 60


@attrs.define
class ReconnectPlan:
    """Attempts to reconnect after a lost connection, until `deadline` or `max_attempts`."""

    deadline: float
    max_attempts: int = MAX_ATTEMPTS
    attempts: int = 0

    def next_delay(self, now: float) -> float | None:
        """How long to wait before the next attempt; None: give up."""
        if self.attempts >= self.max_attempts or now >= self.deadline:
            return None
        delay = 0.0 if self.attempts == 0 else min(MAX_DELAY,
                                                   FIRST_DELAY * 2 ** (self.attempts - 1))
        if now + delay >= self.deadline:
            return None
        self.attempts += 1
        return delay


def retryable_refusal(status: int) -> bool:
    """An HTTP refusal of the upgrade worth retrying: not a wrong token (401), a gone session
    (404) or a refused resume value (400), which another attempt would only repeat."""
    return status not in (400, 401, 403, 404)
