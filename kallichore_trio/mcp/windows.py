"""The Positron windows attached to each workspace, and the commands brokered to them.

A window attaches over the window channel (api/mcp.py) and tells us its commands, its sessions
and when it gets the focus (frames.py). An agent's `run_positron_command` goes to the window of
the workspace that was focused last (or attached last, if none ever said it was focused),
waiting a bounded time for one to attach. When a window leaves with requests unanswered, each is
sent again to the workspace's next window, or fails with the reason if none is left.

Each window has a bounded outgoing queue that the channel route drains; a window that lets it
fill up is not reading, and requests for it fail rather than wait.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import trio

from kallichore_trio.mcp import frames

log = logging.getLogger(__name__)

#: Frames waiting to be written to one window.
OUTGOING_LIMIT = 64
#: Commands waiting for replies, over all windows (an agent retrying in a loop is bounded).
PENDING_LIMIT = 256


class CommandFailed(Exception):
    """A brokered command that did not succeed; the message is for the agent."""


@attrs.define(eq=False)
class Window:
    serial: int
    workspace_id: str
    outgoing: trio.MemorySendChannel[str]
    connected_at: dt.datetime
    positron_version: str | None = None
    commands: list[dict[str, Any]] = attrs.field(factory=list)
    session_ids: list[str] = attrs.field(factory=list)
    foreground_session_id: str | None = None
    #: Larger is more recent; 0 until the window says it is focused.
    focus_order: int = 0
    said_hello: bool = False


@attrs.define(eq=False)
class PendingCommand:
    id: str
    workspace_id: str
    frame: str
    window: Window | None = None
    reply: frames.CommandReply | None = None
    failure: str | None = None
    done: trio.Event = attrs.field(factory=trio.Event)


class WindowBroker:
    def __init__(self, *, find_timeout: float, reply_timeout: float) -> None:
        self.find_timeout = find_timeout
        self.reply_timeout = reply_timeout
        self._windows: dict[str, list[Window]] = {}
        self._pending: dict[str, PendingCommand] = {}
        self._serials = itertools.count(1)
        self._focus = itertools.count(1)
        self._attached: dict[str, trio.Event] = {}

    def __repr__(self) -> str:
        counts = {ws: len(windows) for ws, windows in self._windows.items()}
        return f"<WindowBroker windows={counts} pending={len(self._pending)}>"

    # ---- windows -------------------------------------------------------------------------

    def windows(self, workspace_id: str) -> list[Window]:
        return list(self._windows.get(workspace_id, ()))

    def attach(self, workspace_id: str) -> tuple[Window, trio.MemoryReceiveChannel[str]]:
        """A new window; the channel route writes what arrives on the receive channel."""
        send, receive = trio.open_memory_channel[str](OUTGOING_LIMIT)
        window = Window(next(self._serials), workspace_id, send, dt.datetime.now(dt.UTC))
        self._windows.setdefault(workspace_id, []).append(window)
        self._wake(workspace_id)
        log.info("MCP workspace %s: window %d attached", workspace_id, window.serial)
        return window, receive

    def detach(self, window: Window) -> None:
        """The window left: its unanswered requests go to another window, or fail."""
        windows = self._windows.get(window.workspace_id, [])
        if window in windows:
            windows.remove(window)
            if not windows:
                del self._windows[window.workspace_id]
        window.outgoing.close()
        log.info("MCP workspace %s: window %d detached", window.workspace_id, window.serial)
        for pending in list(self._pending.values()):
            if pending.window is window and not pending.done.is_set():
                pending.window = None
                successor = self.target(window.workspace_id)
                if successor is None or not self._send_to(successor, pending):
                    self._fail(pending, "the Positron window running the command closed before "
                                        "answering, and no other window of the workspace is "
                                        "attached")

    def drop_workspace(self, workspace_id: str) -> None:
        """The workspace was deregistered: its windows are told to go, its requests fail."""
        for window in self._windows.pop(workspace_id, []):
            window.outgoing.close()
        for pending in list(self._pending.values()):
            if pending.workspace_id == workspace_id:
                self._fail(pending, "the workspace was deregistered")

    def target(self, workspace_id: str) -> Window | None:
        """The window commands go to: the one focused last, else the one attached last."""
        windows = self._windows.get(workspace_id)
        if not windows:
            return None
        return max(windows, key=lambda w: (w.focus_order, w.serial))

    def known_session_ids(self, workspace_id: str) -> set[str]:
        return {sid for w in self._windows.get(workspace_id, ()) for sid in w.session_ids}

    def on_frame(self, window: Window, frame: frames.WindowFrame) -> None:
        if isinstance(frame, frames.Hello):
            window.said_hello = True
            window.positron_version = frame.positron_version
            window.commands = frame.commands
            window.session_ids = frame.session_ids
            window.foreground_session_id = frame.foreground_session_id
            if frame.focused:
                window.focus_order = next(self._focus)
        elif isinstance(frame, frames.CommandsChanged):
            window.commands = frame.commands
        elif isinstance(frame, frames.ForegroundChanged):
            window.foreground_session_id = frame.session_id
        elif isinstance(frame, frames.SessionsChanged):
            window.session_ids = frame.session_ids
        elif isinstance(frame, frames.Focused):
            window.focus_order = next(self._focus)
        elif isinstance(frame, frames.CommandReply):
            pending = self._pending.get(frame.id)
            if pending is None or pending.window is not window:
                log.info("MCP workspace %s: window %d answered unknown request %r",
                         window.workspace_id, window.serial, frame.id)
                return
            pending.reply = frame
            pending.done.set()

    # ---- commands --------------------------------------------------------------------------

    async def wait_target(self, workspace_id: str) -> Window:
        """The window to send to, waiting up to `find_timeout` for one to attach."""
        with trio.move_on_after(self.find_timeout):
            while (window := self.target(workspace_id)) is None:
                event = self._attached.setdefault(workspace_id, trio.Event())
                await event.wait()
            return window
        raise CommandFailed(
            f"No Positron window is attached to this workspace (waited "
            f"{self.find_timeout:g} s). Open the workspace in Positron, with MCP enabled, "
            "and try again.")

    async def run_command(self, workspace_id: str, command_id: str, args: Any, *,
                          agent_name: str | None, agent_version: str | None) -> Any:
        """Run `command_id` in the workspace's window; its result, or CommandFailed."""
        window = await self.wait_target(workspace_id)
        if len(self._pending) >= PENDING_LIMIT:
            raise CommandFailed("Too many Positron commands are waiting for replies; try later")
        request_id = uuid.uuid4().hex
        deadline_ms = int((time.time() + self.reply_timeout) * 1000)
        pending = PendingCommand(request_id, workspace_id, frames.command_request(
            request_id=request_id, command_id=command_id, args=args, agent_name=agent_name,
            agent_version=agent_version, deadline_ms=deadline_ms))
        self._pending[request_id] = pending
        try:
            if not self._send_to(window, pending):
                self._fail(pending, "the Positron window is not reading its channel")
            with trio.move_on_after(self.reply_timeout):
                await pending.done.wait()
        finally:
            del self._pending[request_id]
        if not pending.done.is_set():
            raise CommandFailed(f"The Positron window did not answer {command_id!r} within "
                                f"{self.reply_timeout:g} s")
        if pending.failure is not None:
            raise CommandFailed(f"Command {command_id!r} failed: {pending.failure}")
        reply = pending.reply
        assert reply is not None
        if not reply.ok:
            detail = "; ".join(x for x in (reply.reason, reply.message) if x) or "no reason given"
            raise CommandFailed(f"Positron refused or failed command {command_id!r}: {detail}")
        return reply.result

    # ---- internals -------------------------------------------------------------------------

    def _send_to(self, window: Window, pending: PendingCommand) -> bool:
        try:
            window.outgoing.send_nowait(pending.frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        pending.window = window
        return True

    @staticmethod
    def _fail(pending: PendingCommand, reason: str) -> None:
        if not pending.done.is_set():
            pending.failure = reason
            pending.done.set()

    def _wake(self, workspace_id: str) -> None:
        event = self._attached.pop(workspace_id, None)
        if event is not None:
            event.set()

    def all_windows(self) -> Iterator[Window]:
        for windows in self._windows.values():
            yield from windows


__all__ = ["CommandFailed", "PendingCommand", "Window", "WindowBroker"]
