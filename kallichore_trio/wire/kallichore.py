"""Kallichore's WebSocket envelope (docs/protocol.md §4.1-§4.3).

Client -> server: a Jupyter "relay message" JSON object (``parse_client_frame``).
Server -> client: ``{"kind":"jupyter",...}`` relayed kernel messages (``relay_frame``) and
``{"kind":"kernel","<event>":<payload>}`` supervisor events (``kernel_event_frame``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import attrs

from kallichore_trio.wire.jupyter import KernelMessage, format_date

CLIENT_CHANNELS = frozenset({"shell", "control", "stdin"})

KERNEL_EVENTS = frozenset(
    {
        "status",
        "output",
        "executionQueued",
        "workingDirChanged",
        "resourceUsage",
        "clientDisconnected",
        "exited",
        "handshakeCompleted",
        "executionRequested",
        "supervisorRestarted",
        "framesLost",
    }
)

_REQUIRED_FIELDS = ("header", "channel", "content", "metadata", "buffers")


class ClientFrameError(ValueError):
    """A client frame that cannot be turned into a kernel message (it is dropped)."""


class ResumeError(ValueError):
    """A `resume` query parameter that is not a sequence number (the upgrade is refused)."""


#: The largest sequence number a client may name (a signed 64-bit integer, as JSON readers
#: in other languages can hold it).
MAX_SEQ = 2**63 - 1


@attrs.frozen
class Ack:
    """``{"kind": "ack", "seq": N}``: a resuming client processed every frame up to N."""

    seq: int


@attrs.frozen
class ClientMessage:
    """A message from a WebSocket client; only msg_id/msg_type of its headers survive."""

    msg_id: str
    msg_type: str
    parent: tuple[str, str] | None  # (msg_id, msg_type)
    channel: str
    content: Any  # parsed JSON
    metadata: Any  # parsed JSON
    buffers: tuple[bytes, ...] = ()  # base64-decoded

    def relay_dict(self) -> dict[str, Any]:
        """The relay-format view (how queued execute_requests are shown in the HTTP API)."""
        return {
            "header": {"msg_id": self.msg_id, "msg_type": self.msg_type},
            "parent_header": (
                None
                if self.parent is None
                else {"msg_id": self.parent[0], "msg_type": self.parent[1]}
            ),
            "channel": self.channel,
            "content": self.content,
            "metadata": self.metadata,
            "buffers": [base64.b64encode(b).decode("ascii") for b in self.buffers],
        }


def _ids(obj: Any, what: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise ClientFrameError(f"{what} must be a JSON object")
    msg_id, msg_type = obj.get("msg_id"), obj.get("msg_type")
    if not isinstance(msg_id, str) or not isinstance(msg_type, str):
        raise ClientFrameError(f"{what} must have string 'msg_id' and 'msg_type'")
    return msg_id, msg_type


def _decode_buffers(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list):
        raise ClientFrameError("'buffers' must be a list of base64 strings")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise ClientFrameError(f"buffers[{i}] is not a string")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
            raise ClientFrameError(f"buffers[{i}] is not valid base64: {exc}") from None
    return tuple(out)


def parse_client_frame(text: str | bytes) -> ClientMessage | Ack:
    """Parse one client text frame: a message for the kernel, or a resuming client's `Ack`
    (docs/durability.md).

    ``header``, ``channel``, ``content``, ``metadata`` and ``buffers`` are required; other
    top-level keys (e.g. ``"kind"``) are ignored. ``parent_header`` may be absent or null.
    Deliberate difference from Kallichore: a ``{}`` parent header is accepted as "no
    parent" (Kallichore silently drops such a message, which helps nobody).
    Only shell, control and stdin are accepted as channels.
    """
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ClientFrameError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ClientFrameError("frame is not a JSON object")
    if obj.get("kind") == "ack":
        return _ack(obj)
    missing = [name for name in _REQUIRED_FIELDS if name not in obj]
    if missing:
        raise ClientFrameError(f"frame lacks required field(s): {', '.join(missing)}")

    msg_id, msg_type = _ids(obj["header"], "'header'")
    raw_parent = obj.get("parent_header")
    parent = None if raw_parent is None or raw_parent == {} else _ids(raw_parent, "'parent_header'")

    channel = obj["channel"]
    if channel not in CLIENT_CHANNELS:
        raise ClientFrameError(
            f"unsupported channel {channel!r}: only shell, control and stdin can be sent"
        )
    return ClientMessage(
        msg_id=msg_id,
        msg_type=msg_type,
        parent=parent,
        channel=channel,
        content=obj["content"],
        metadata=obj["metadata"],
        buffers=_decode_buffers(obj["buffers"]),
    )


def _ack(obj: dict[str, Any]) -> Ack:
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ClientFrameError(f"an ack needs a non-negative integer 'seq', not {seq!r}")
    return Ack(seq)


def parse_resume(values: Sequence[str]) -> int | None:
    """The `resume` query parameter of a channels upgrade (every value given): None when
    absent, else the last sequence number the client processed. ResumeError unless it is given
    once, as a decimal integer in 0..MAX_SEQ."""
    if not values:
        return None
    if len(values) > 1:
        raise ResumeError("resume must be given once")
    value = values[0]
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_SEQ:
        raise ResumeError(f"resume must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def resume_from_target(target: bytes) -> int | None:
    """`parse_resume` of the query of an HTTP request target (``/path?resume=5``)."""
    query = target.partition(b"?")[2].decode("latin-1")
    return parse_resume(parse_qs(query, keep_blank_values=True).get("resume", []))


def with_seq(seq: int, frame: str) -> str:
    """A server frame (a JSON object) with ``"seq"`` as its first field, for a resuming
    client."""
    return f'{{"seq":{seq},{frame[1:]}'


# --- server -> client -------------------------------------------------------------------

# Headers and ids are escaped to ASCII: always valid to send, even with a stray surrogate.
_encode = json.JSONEncoder(separators=(",", ":")).encode

# Precomputed splices for the channels we relay from; anything else is JSON-encoded.
_CHANNEL_SPLICE = {
    name: f',"channel":"{name}","content":' for name in ("shell", "iopub", "control", "stdin")
}


def relay_frame(msg: KernelMessage, channel: str) -> str:
    """The ``kind: "jupyter"`` text frame for a kernel message that arrived on ``channel``.

    Hot path: the kernel's raw content and metadata JSON are spliced in, never re-parsed.
    They come from a (signed) kernel and are trusted to be JSON; an empty frame becomes
    ``{}`` so the envelope stays valid.
    """
    header = msg.header
    parts = [
        '{"kind":"jupyter","header":{"msg_id":',
        _encode(header["msg_id"]),
        ',"msg_type":',
        _encode(header["msg_type"]),
    ]
    parent = msg.parent_header
    if parent is None:
        parts.append('},"parent_header":null')
    else:
        parts += (
            '},"parent_header":{"msg_id":',
            _encode(parent["msg_id"]),
            ',"msg_type":',
            _encode(parent["msg_type"]),
            "}",
        )
    splice = _CHANNEL_SPLICE.get(channel)
    if splice is None:
        splice = f',"channel":{_encode(channel)},"content":'
    parts += (
        splice,
        msg.content.decode("utf-8", "replace") if msg.content else "{}",
        ',"metadata":',
        msg.metadata.decode("utf-8", "replace") if msg.metadata else "{}",
    )
    if msg.buffers:
        encoded = '","'.join(base64.b64encode(b).decode("ascii") for b in msg.buffers)
        parts += (',"buffers":["', encoded, '"]}')
    else:
        parts.append(',"buffers":[]}')
    return "".join(parts)


_encode_event = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def kernel_event_frame(event: str, payload: Any) -> str:
    """``{"kind":"kernel","<event>":<payload>}`` for one of the ``KERNEL_EVENTS``.

    Non-ASCII text is kept as is (as serde_json writes it); payload strings must be valid
    Unicode, so decode process output with ``errors="replace"``.
    """
    if event not in KERNEL_EVENTS:
        raise ValueError(f"unknown kernel event {event!r}; expected one of {sorted(KERNEL_EVENTS)}")
    return _encode_event({"kind": "kernel", event: payload})


def status_event(status: str, reason: str | None) -> str:
    return kernel_event_frame("status", {"status": status, "reason": reason})


def output_event(stream: str, text: str) -> str:
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"output stream must be 'stdout' or 'stderr', not {stream!r}")
    return kernel_event_frame("output", [stream, text])


def execution_queued_event(msg_id: str) -> str:
    return kernel_event_frame("executionQueued", msg_id)


def working_dir_changed_event(path: str) -> str:
    return kernel_event_frame("workingDirChanged", path)


def resource_usage_event(usage: Mapping[str, Any]) -> str:
    return kernel_event_frame("resourceUsage", dict(usage))


def client_disconnected_event(reason: str) -> str:
    return kernel_event_frame("clientDisconnected", reason)


def supervisor_restarted_event(previous_server_id: str, gap_ms: int) -> str:
    """The first frame of a session a restarted daemon took over (docs/durability.md): the
    kernel ran on while `gap_ms` passed without a supervisor, and what it published then is
    lost."""
    return kernel_event_frame("supervisorRestarted", {
        "previous_server_id": previous_server_id, "gap_ms": int(gap_ms)})


def frames_lost_event(first: int, last: int) -> str:
    """A resuming client will not receive frames `first`..`last`: the outbox no longer holds
    them (docs/durability.md). Carries no seq: it is about the sequence, not in it."""
    return kernel_event_frame("framesLost", {"first": first, "last": last})


def exited_event(code: int) -> str:
    """``code`` is the exit status; -1 when the kernel was killed by a signal."""
    return kernel_event_frame("exited", int(code))


def handshake_completed_event(session_id: str, connection_info: Mapping[str, Any]) -> str:
    return kernel_event_frame("handshakeCompleted", [session_id, dict(connection_info)])


def execution_requested_event(
    *,
    msg_id: str,
    code: str,
    requested_at: datetime,
    source: str,
    workspace_id: str,
    tool: str,
    agent_name: str | None = None,
    agent_version: str | None = None,
) -> str:
    """Sent to a session's client before an agent's execution is queued, so that the console
    can show code it did not send itself (docs/differences.md, "Execute and history").
    `requested_at` is written as RFC 3339 in UTC; absent agent fields are left out."""
    attribution: dict[str, Any] = {"source": source}
    if agent_name is not None:
        attribution["agent_name"] = agent_name
    if agent_version is not None:
        attribution["agent_version"] = agent_version
    attribution["workspace_id"] = workspace_id
    attribution["tool"] = tool
    return kernel_event_frame("executionRequested", {
        "msg_id": msg_id,
        "code": code,
        "requested_at": format_date(requested_at),
        "attribution": attribution,
    })
