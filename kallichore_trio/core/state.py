"""The session status state machine and its idle/busy clocks. Pure: the caller passes `now`.

Statuses follow the reference (docs/protocol.md §6.1): a new session is `idle`, start
makes it `starting`, iopub busy/idle statuses move it between `busy` and `idle`, heartbeat loss
makes it `offline`, and process exit makes it `exited`. Setting the current status again is a
no-op, so every change yields exactly one status event.

A kernel re-attached after a daemon crash may be running a cell the new daemon never saw. Its
status is then a guess, `busy` (`guess=True`), until the kernel says: its shell answering our
kernel_info_request means it is free (`after_shell_answer`), and any status it publishes
replaces the guess. The old cell's idle status has a parent the daemon never sent; it counts
like any other (core/relay.py decides on the message type only).
"""

from __future__ import annotations

import attrs

from kallichore_trio.models import Status

#: Statuses in which the idle clock runs (and that restart it: the on_activity callback).
IDLE_LIKE: frozenset[str] = frozenset({"idle", "ready", "exited"})


@attrs.define
class SessionState:
    status: Status = "idle"
    #: Monotonic instants; None while the clock does not run.
    idle_since: float | None = None
    busy_since: float | None = None
    #: The status before `offline`, restored when the heartbeat comes back.
    before_offline: Status | None = None
    #: The status is `busy` only because a re-attached kernel's shell has not answered yet.
    busy_guessed: bool = False

    def set(self, new: Status, now: float, *, guess: bool = False) -> bool:
        """Move to `new`; return whether anything changed (and so an event is due). Any
        status that is not a guess ends a guessed `busy`, even when it is `busy` itself."""
        self.busy_guessed = guess and new == "busy"
        if new == self.status:
            return False
        if new == "offline":
            self.before_offline = self.status
        elif self.status == "offline":
            self.before_offline = None
        self.status = new
        self.idle_since = now if new in IDLE_LIKE else None
        self.busy_since = now if new == "busy" else None
        return True

    def after_shell_answer(self) -> Status | None:
        """The status due when a re-attached kernel answered kernel_info on shell: a kernel
        running a cell holds its shell, so the answer means the cell is over. Only a guess
        is corrected; a status the kernel published since stands."""
        return "idle" if self.busy_guessed else None

    def idle_seconds(self, now: float) -> int:
        return int(now - self.idle_since) if self.idle_since is not None else 0

    def busy_seconds(self, now: float) -> int:
        return int(now - self.busy_since) if self.busy_since is not None else 0

    def after_heartbeat(self, alive: bool) -> tuple[Status, str] | None:
        """The status change (and its reason) a heartbeat result calls for, if any: back from
        offline when it answers again, offline when a quiet kernel stops answering. A busy
        kernel may legitimately miss beats (IRkernel answers none while busy), and its process
        is alive: only a quiet, unanswering kernel is offline."""
        if alive and self.status == "offline":
            return self.before_offline or "idle", "heartbeat detected after offline"
        if not alive and self.status in ("idle", "ready"):
            return "offline", "lost heartbeat"
        return None
