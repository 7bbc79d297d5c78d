"""The session's decisions on the message path, both ways. Pure: the session carries them out.

Kernel to client (`Session.on_kernel_message`, once per kernel message):

- `kind_of(channel, msg_type)`: what a message is to the session. Stream output is relayed as
  *droppable* (the outbox may shed it under overflow, and it may wait for company before it
  is written); every other message is relayed as urgent. An iopub `status` may change the
  session's status; an execute_reply may end the active request.
- `status_verdict(content, parent_msg_type)` for a status: the new status, whether the request
  it reports on may have ended (the queue advances when that is the active request), and
  whether the kernel's working directory is to be checked (after an execute_request).

The execution queue advances when the active request ends: on its execute_reply or its idle
status, whichever comes first (queue.py says why).

Client to kernel (`Session.deliver`, once per client message):

- `client_action(msg_type, content)`: send it, or put an execute_request with code through the
  execution queue (sent now, or queued with an `executionQueued` event), or clear the queue
  first (an interrupt or shutdown request).

The one rule for clearing the queue: whatever ends what the kernel is running drops every
request queued behind it. That is a request in `ENDS_RUNNING` (the client's, or the daemon's
own interrupt and shutdown), SIGINT, SIGKILL, and the kernel's exit; the session clears the
queue for all of them through one method (`Session.clear_queue`).

Each function returns one of a few module constants, so deciding allocates nothing.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from kallichore_trio.models import Status


class Kind(enum.Enum):
    """What a kernel message is to the session."""

    #: Relayed as it is, urgent (replies, comms, display data, errors...).
    PLAIN = "plain"
    #: iopub stream output: relayed as droppable, and it may wait for more to join its write.
    OUTPUT = "output"
    #: iopub status: see `status_verdict`.
    STATUS = "status"
    #: shell execute_reply: the request it answers has ended (the queue may advance).
    EXECUTE_REPLY = "execute_reply"


PLAIN = Kind.PLAIN
OUTPUT = Kind.OUTPUT
STATUS = Kind.STATUS
EXECUTE_REPLY = Kind.EXECUTE_REPLY

_IOPUB_KINDS = {"status": STATUS, "stream": OUTPUT}


def kind_of(channel: str, msg_type: str) -> Kind:
    if channel == "iopub":
        return _IOPUB_KINDS.get(msg_type, PLAIN)
    if channel == "shell" and msg_type == "execute_reply":
        return EXECUTE_REPLY
    return PLAIN


@attrs.frozen
class StatusVerdict:
    """What an iopub status means to the session."""

    #: The session's new status; None: the status says nothing we track (starting, junk).
    status: Status | None
    #: The request the status reports on (its parent) may have ended: idle.
    ends_request: bool
    #: The kernel may have changed its working directory: idle after an execute_request.
    checks_cwd: bool


IGNORED = StatusVerdict(None, ends_request=False, checks_cwd=False)
BUSY = StatusVerdict("busy", ends_request=False, checks_cwd=False)
IDLE = StatusVerdict("idle", ends_request=True, checks_cwd=False)
IDLE_AFTER_EXECUTE = StatusVerdict("idle", ends_request=True, checks_cwd=True)


def status_verdict(content: Any, parent_msg_type: str | None) -> StatusVerdict:
    """`content` is the status message's parsed content (anything a kernel may send)."""
    state = content.get("execution_state") if isinstance(content, dict) else None
    if state == "busy":
        return BUSY
    if state == "idle":
        return IDLE_AFTER_EXECUTE if parent_msg_type == "execute_request" else IDLE
    return IGNORED


#: Requests that end what the kernel is running: the execution queue is cleared when one is
#: sent, by a client or by the daemon itself.
ENDS_RUNNING: frozenset[str] = frozenset({"interrupt_request", "shutdown_request"})


class ClientAction(enum.Enum):
    """What the session does with a client's message."""

    #: Straight to the kernel (or held while there is none).
    SEND = "send"
    #: An execute_request with code: through the execution queue (sent now, or queued and
    #: announced with `executionQueued`, or refused when the queue is full).
    EXECUTE = "execute"
    #: A request in ENDS_RUNNING: clear the execution queue, then send it.
    CLEAR_QUEUE_AND_SEND = "clear_queue_and_send"


SEND = ClientAction.SEND
EXECUTE = ClientAction.EXECUTE
CLEAR_QUEUE_AND_SEND = ClientAction.CLEAR_QUEUE_AND_SEND


def client_action(msg_type: str, content: Any) -> ClientAction:
    if msg_type == "execute_request":
        # Without code (a malformed request) it is not followed nor queued: the kernel
        # answers it as it sees fit.
        if isinstance(content, dict) and isinstance(content.get("code"), str):
            return EXECUTE
        return SEND
    if msg_type in ENDS_RUNNING:
        return CLEAR_QUEUE_AND_SEND
    return SEND
