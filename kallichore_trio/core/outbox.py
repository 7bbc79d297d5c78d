"""Frames on their way to a session's client: bounded, ordered, sequence-numbered. Pure.

Every frame the session produces (relayed kernel messages and supervisor events) is appended
here with the next sequence number (a session's first frame is 1). While no client is
connected frames accumulate, and the next client receives them in order (the reference's
"buffered while disconnected"). Two ways to read:

- `read` + `ack`: the oldest frames still held; the writer releases what it wrote (a client
  that does not resume).
- `read_after(cursor)`: the frames after a client's cursor, with the ranges no longer held
  reported as `Lost`; frames are released only by the client's own acknowledgement (`ack`), so
  frames written to a connection that broke are still here for the next one (resume,
  docs/durability.md). Numbers below `first_seq` belong to a predecessor daemon and are lost;
  that range is reported after the first frame (the `supervisorRestarted` event) when the
  outbox still holds it.

Bounds: `max_frames` and `max_bytes`, three tiers. Past the bounds the oldest *droppable*
frame goes first (stream output, process output, resource samples: things that are superseded
or repeated). Ordinary frames (display data, errors, comms, most events) are kept until twice
the bounds, then the oldest of them goes. *Kept* frames (statuses and replies: what a client
needs to know a request ended) are shed only past four times the bounds, the last resort that
keeps memory bounded whatever a kernel does. Every drop is counted; a reader is told how many
frames it missed since its last read (or, resuming, which ones) so it can report the gap.

Urgency is separate from droppability: an urgent frame is to be written at once, the others
may wait a moment for more output to share their write. By default every frame but droppable
output is urgent; a resource sample is droppable and urgent. `can_wait` says no urgent frame
is pending.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

import attrs


@attrs.frozen
class OutboxStatistics:
    frames: int
    bytes: int
    next_seq: int
    dropped: int
    #: Of `dropped`: ordinary and kept frames (past twice the bounds).
    dropped_essential: int
    #: Of `dropped_essential`: kept frames (past four times the bounds).
    dropped_kept: int
    peak_frames: int


@attrs.frozen
class Lost:
    """Frames `first`..`last` (inclusive) are not held any more."""

    first: int
    last: int


@attrs.frozen
class ResumeBatch:
    """What `read_after` found: frames as `(seq, text)` and `Lost` ranges, in order, and the
    cursor to read after next time (the last number covered)."""

    items: list[tuple[int, str] | Lost]
    cursor: int


@attrs.frozen
class Batch:
    """Frames read from the outbox: `(seq, text)` pairs and how many were dropped before them."""

    frames: list[tuple[int, str]]
    missed: int


class Outbox:
    def __init__(self, *, max_frames: int, max_bytes: int, first_seq: int = 1) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: The number of this outbox's first frame; lower numbers were a predecessor's.
        self.first_seq = first_seq
        self._frames: OrderedDict[int, str] = OrderedDict()
        self._droppable: deque[int] = deque()  # seqs of droppable frames, oldest first
        self._ordinary: deque[int] = deque()  # seqs of frames neither droppable nor kept
        self._bytes = 0
        self._next_seq = first_seq
        self._dropped = 0
        self._dropped_essential = 0
        self._dropped_kept = 0
        self._reported_drops = 0
        self._peak = 0
        self._last_urgent = -1  # seq of the newest frame that must not wait for company

    def __len__(self) -> int:
        return len(self._frames)

    def __repr__(self) -> str:
        return (
            f"<Outbox frames={len(self._frames)} bytes={self._bytes} next_seq={self._next_seq} "
            f"dropped={self._dropped}>"
        )

    def append(self, text: str, *, droppable: bool = False, urgent: bool | None = None,
               kept: bool = False) -> int:
        """Add a frame; return its sequence number. `droppable` and `kept` choose its tier (see
        above; ordinary by default). An urgent frame is to be written at once (see
        `can_wait`); by default every frame but droppable output is urgent."""
        seq = self._next_seq
        self._next_seq += 1
        self._frames[seq] = text
        self._bytes += len(text)
        if droppable:
            self._droppable.append(seq)
        elif not kept:
            self._ordinary.append(seq)
        if (not droppable) if urgent is None else urgent:
            self._last_urgent = seq
        if len(self._frames) > self.max_frames or self._bytes > self.max_bytes:
            self._shed()
        self._peak = max(self._peak, len(self._frames))
        return seq

    def _over(self, factor: int) -> bool:
        return (len(self._frames) > factor * self.max_frames
                or self._bytes > factor * self.max_bytes)

    def _shed(self) -> None:
        while self._over(1):
            if self._droppable:
                text = self._frames.pop(self._droppable.popleft(), None)
                if text is None:  # already acknowledged
                    continue
            elif self._ordinary and self._over(2):
                text = self._frames.pop(self._ordinary.popleft(), None)
                if text is None:
                    continue
                self._dropped_essential += 1
            elif self._over(4) and len(self._frames) > 1:
                _, text = self._frames.popitem(last=False)
                self._dropped_essential += 1
                self._dropped_kept += 1
            else:
                return
            self._dropped += 1
            self._bytes -= len(text)

    @property
    def produced(self) -> int:
        """How many frames were ever appended here."""
        return self._next_seq - self.first_seq

    @property
    def last_seq(self) -> int:
        """The number of the newest frame (first_seq - 1 before any)."""
        return self._next_seq - 1

    @property
    def last_urgent(self) -> int:
        """The number of the newest urgent frame (see `append`), -1 if none."""
        return self._last_urgent

    @property
    def can_wait(self) -> bool:
        """No pending frame is urgent: what is pending may wait for more output to join it
        in one write (Config.output_linger)."""
        return not self._frames or self._last_urgent < next(iter(self._frames))

    def read(self, limit: int = 256, max_bytes: int = 256 * 1024) -> Batch:
        """The oldest unacknowledged frames, up to `limit` of them and about `max_bytes` (at
        least one frame, however large), and the drops since the last read."""
        frames = []
        size = 0
        for seq, text in self._frames.items():
            frames.append((seq, text))
            size += len(text)
            if len(frames) >= limit or size >= max_bytes:
                break
        missed = self._dropped - self._reported_drops
        self._reported_drops = self._dropped
        return Batch(frames, missed)

    def read_after(self, cursor: int, limit: int = 256,
                   max_bytes: int = 256 * 1024) -> ResumeBatch:
        """The frames numbered above `cursor`, in order, with a `Lost` for each range no longer
        held; up to `limit` frames and about `max_bytes` (at least one frame if any). Releases
        nothing (the client acknowledges with `ack`). Costs a walk over the frames held up to the
        cursor (sent, not yet acknowledged) plus what it returns; a gap costs nothing more."""
        items: list[tuple[int, str] | Lost] = []
        last = self._next_seq - 1
        expected = min(cursor, last) + 1  # the next number to account for
        size = count = 0  # of the frames in items
        if expected < self.first_seq:
            # A predecessor's numbers: reported after its successor's first frame, which says
            # the supervisor restarted (durable.reattach), when that frame is still here.
            lost = Lost(expected, self.first_seq - 1)
            first = self._frames.get(self.first_seq)
            if first is not None:
                items += ((self.first_seq, first), lost)
                size, count = len(first), 1
                expected = self.first_seq + 1
            else:
                items.append(lost)
                expected = self.first_seq
        full = False
        for seq, text in self._held_from(expected):
            if count >= limit or size >= max_bytes:
                full = True  # a gap before this frame is for the next read to report whole
                break
            if seq > expected:
                _add_lost(items, expected, seq - 1)
            items.append((seq, text))
            size += len(text)
            count += 1
            expected = seq + 1
        if not full and expected <= last:
            _add_lost(items, expected, last)
            expected = last + 1
        return ResumeBatch(items, expected - 1)

    def _held_from(self, seq: int) -> Iterator[tuple[int, str]]:
        """The held frames numbered `seq` and above, oldest first. A reading client is usually
        near the newest frame with some sent frames not yet acknowledged behind it: then the
        walk starts from the newest end."""
        frames = self._frames
        oldest = next(iter(frames), None)
        if oldest is None or seq <= oldest:
            return iter(frames.items())
        if self._next_seq - seq < seq - oldest:
            newer = []
            for held in reversed(frames):
                if held < seq:
                    break
                newer.append(held)
            return ((held, frames[held]) for held in reversed(newer))
        return ((held, text) for held, text in frames.items() if held >= seq)

    def ack(self, seq: int) -> None:
        """The frame `seq` (and everything before it) reached a client: release them."""
        while self._frames:
            first = next(iter(self._frames))
            if first > seq:
                break
            self._bytes -= len(self._frames.pop(first))
        while self._droppable and self._droppable[0] <= seq:
            self._droppable.popleft()
        while self._ordinary and self._ordinary[0] <= seq:
            self._ordinary.popleft()

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            frames=len(self._frames),
            bytes=self._bytes,
            next_seq=self._next_seq,
            dropped=self._dropped,
            dropped_essential=self._dropped_essential,
            dropped_kept=self._dropped_kept,
            peak_frames=self._peak,
        )


def _add_lost(items: list[tuple[int, str] | Lost], first: int, last: int) -> None:
    """Append Lost(first, last), or extend the Lost just before it (a predecessor's range
    that goes on)."""
    previous = items[-1] if items else None
    if isinstance(previous, Lost) and previous.last == first - 1:
        items[-1] = Lost(previous.first, last)
    else:
        items.append(Lost(first, last))
