"""What travels on a session's channel, typed: Jupyter messages and kernel events.

The server sends `{"kind": "jupyter", ...}` relayed kernel messages and `{"kind": "kernel",
"<event>": payload}` supervisor events (docs/protocol.md §4.2, §4.3); the client sends Jupyter
messages in relay form (§4.1). Pure: no I/O.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import attrs


@attrs.frozen
class Message:
    """A kernel message relayed by the daemon. `parent_id` is the msg_id of the request it
    answers (None for unsolicited messages)."""

    msg_id: str
    msg_type: str
    channel: str
    content: dict[str, Any]
    parent_id: str | None = None
    parent_type: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)
    buffers: list[str] = attrs.field(factory=list)  # base64, as relayed

    def summary(self) -> str:
        """One line for failure reports."""
        content = json.dumps(self.content, ensure_ascii=False)
        if len(content) > 160:
            content = content[:157] + "..."
        return f"{self.channel}/{self.msg_type} {content}"


# ---- kernel events -----------------------------------------------------------------------


@attrs.frozen
class KernelEvent:
    """Base of the supervisor events; `name` is the wire name (camelCase)."""

    name: str


@attrs.frozen
class StatusEvent(KernelEvent):
    status: str
    reason: str | None = None


@attrs.frozen
class OutputEvent(KernelEvent):
    """A line the kernel process wrote to its own stdout or stderr (not the Jupyter
    streams: those are `stream` messages)."""

    stream: str
    text: str


@attrs.frozen
class ExitedEvent(KernelEvent):
    exit_code: int  # -1 when a signal killed it


@attrs.frozen
class WorkingDirChanged(KernelEvent):
    path: str


@attrs.frozen
class ResourceUsageEvent(KernelEvent):
    usage: dict[str, Any]


@attrs.frozen
class ClientDisconnected(KernelEvent):
    reason: str


@attrs.frozen
class ExecutionQueued(KernelEvent):
    msg_id: str


@attrs.frozen
class FramesLost(KernelEvent):
    """Frames `first` to `last` of the session's stream will not come (the daemon shed them,
    or another client consumed them); see docs/client.md, "Resuming a broken channel".
    `history`: reported when this client attached, about frames from before it."""

    first: int
    last: int
    history: bool = False


@attrs.frozen
class SupervisorRestarted(KernelEvent):
    """The daemon crashed and another took the session over (docs/durability.md): what the
    kernel published meanwhile is lost. `history` as for FramesLost."""

    previous_server_id: str | None
    gap_ms: int | None
    history: bool = False


@attrs.frozen
class OtherEvent(KernelEvent):
    """An event this client has no class for (handshakeCompleted, executionRequested, or a
    newer one)."""

    payload: Any


def _event(name: str, payload: Any) -> KernelEvent:
    if name == "status" and isinstance(payload, dict):
        return StatusEvent(name, str(payload.get("status")), payload.get("reason"))
    if name == "output" and isinstance(payload, list) and len(payload) == 2:
        return OutputEvent(name, str(payload[0]), str(payload[1]))
    if name == "exited" and isinstance(payload, int):
        return ExitedEvent(name, payload)
    if name == "workingDirChanged" and isinstance(payload, str):
        return WorkingDirChanged(name, payload)
    if name == "resourceUsage" and isinstance(payload, dict):
        return ResourceUsageEvent(name, payload)
    if name == "clientDisconnected":
        return ClientDisconnected(name, str(payload))
    if name == "executionQueued" and isinstance(payload, str):
        return ExecutionQueued(name, payload)
    if (name == "framesLost" and isinstance(payload, dict)
            and _is_int(payload.get("first")) and _is_int(payload.get("last"))):
        return FramesLost(name, payload["first"], payload["last"])
    if name == "supervisorRestarted" and isinstance(payload, dict):
        server, gap = payload.get("previous_server_id"), payload.get("gap_ms")
        return SupervisorRestarted(name, server if isinstance(server, str) else None,
                                   gap if _is_int(gap) else None)
    return OtherEvent(name, payload)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FrameError(ValueError):
    """A server frame that is neither a relayed message nor an event."""


def parse_frame(text: str) -> Message | KernelEvent:
    """One server text frame."""
    return parse_object(load_frame(text))


def load_frame(text: str) -> dict[str, Any]:
    """A server text frame as a JSON object (FrameError when it is none)."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object")
    return obj


def parse_object(obj: dict[str, Any]) -> Message | KernelEvent:
    """A server frame already loaded (`load_frame`), its `seq` taken out."""
    kind = obj.get("kind")
    if kind == "kernel":
        names = [k for k in obj if k != "kind"]
        if len(names) != 1:
            raise FrameError(f"kernel event frame with keys {sorted(obj)}")
        return _event(names[0], obj[names[0]])
    if kind == "jupyter":
        header = obj.get("header") or {}
        parent = obj.get("parent_header") or {}
        content = obj.get("content")
        metadata = obj.get("metadata")
        return Message(
            msg_id=str(header.get("msg_id", "")),
            msg_type=str(header.get("msg_type", "")),
            channel=str(obj.get("channel", "")),
            content=content if isinstance(content, dict) else {},
            parent_id=parent.get("msg_id") if isinstance(parent, dict) else None,
            parent_type=parent.get("msg_type") if isinstance(parent, dict) else None,
            metadata=metadata if isinstance(metadata, dict) else {},
            buffers=obj.get("buffers") if isinstance(obj.get("buffers"), list) else [],
        )
    raise FrameError(f"unknown frame kind {kind!r}")


def new_msg_id() -> str:
    return uuid.uuid4().hex


def request(msg_type: str, content: dict[str, Any], *, channel: str = "shell",
            msg_id: str | None = None, parent: tuple[str, str] | None = None,
            metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A client message in relay form (docs/protocol.md §4.1); `parent` is (msg_id,
    msg_type) of the message answered (an input_reply answers an input_request)."""
    return {
        "header": {"msg_id": msg_id or new_msg_id(), "msg_type": msg_type},
        "parent_header": None if parent is None
        else {"msg_id": parent[0], "msg_type": parent[1]},
        "channel": channel,
        "content": content,
        "metadata": metadata or {},
        "buffers": [],
    }


def execute_content(code: str, *, silent: bool = False, store_history: bool = True,
                    allow_stdin: bool = False, stop_on_error: bool = True) -> dict[str, Any]:
    return {"code": code, "silent": silent, "store_history": store_history,
            "user_expressions": {}, "allow_stdin": allow_stdin,
            "stop_on_error": stop_on_error}
