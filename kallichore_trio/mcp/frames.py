"""The window channel's frames (docs/mcp.md, "The window channel"). Pure.

JSON text frames tagged by `kind`. A window sends `hello`, `commands_changed`,
`foreground_changed`, `sessions_changed`, `focused` and `command_reply`; the daemon sends
`command_request`. Parsing is lenient about extra fields and strict about the ones it uses, so a
malformed frame is refused with a reason rather than half-applied.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

#: A frame from a window larger than this is refused (a command list is a few hundred KiB at most).
MAX_FRAME_BYTES = 4 * 1024 * 1024


class FrameError(ValueError):
    """A window frame that cannot be used; the message says why."""


@attrs.frozen
class Hello:
    positron_version: str | None
    commands: list[dict[str, Any]]
    session_ids: list[str]
    foreground_session_id: str | None
    focused: bool


@attrs.frozen
class CommandsChanged:
    commands: list[dict[str, Any]]


@attrs.frozen
class ForegroundChanged:
    session_id: str | None


@attrs.frozen
class SessionsChanged:
    session_ids: list[str]


@attrs.frozen
class Focused:
    pass


@attrs.frozen
class CommandReply:
    id: str
    ok: bool
    result: Any = None
    reason: str | None = None
    message: str | None = None


WindowFrame = Hello | CommandsChanged | ForegroundChanged | SessionsChanged | Focused | CommandReply


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise FrameError(f"{name} must be a string or null")


def _str_list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FrameError(f"{name} must be a list of strings")
    return value


def _commands(body: dict[str, Any]) -> list[dict[str, Any]]:
    value = body.get("commands", [])
    if not isinstance(value, list):
        raise FrameError("commands must be a list")
    commands = []
    for command in value:
        if not isinstance(command, dict) or not isinstance(command.get("id"), str):
            raise FrameError("each command must be an object with a string id")
        commands.append(command)
    return commands


def parse_window_frame(text: str) -> WindowFrame:
    if len(text) > MAX_FRAME_BYTES:
        raise FrameError(f"frame larger than {MAX_FRAME_BYTES} bytes")
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise FrameError("a frame must be a JSON object")
    kind = body.get("kind")
    if kind == "hello":
        return Hello(
            positron_version=_optional_str(body, "positron_version"),
            commands=_commands(body),
            session_ids=_str_list(body, "session_ids"),
            foreground_session_id=_optional_str(body, "foreground_session_id"),
            focused=body.get("focused") is True,
        )
    if kind == "commands_changed":
        return CommandsChanged(_commands(body))
    if kind == "foreground_changed":
        return ForegroundChanged(_optional_str(body, "session_id"))
    if kind == "sessions_changed":
        return SessionsChanged(_str_list(body, "session_ids"))
    if kind == "focused":
        return Focused()
    if kind == "command_reply":
        reply_id = body.get("id")
        if not isinstance(reply_id, str):
            raise FrameError("command_reply needs a string id")
        ok = body.get("ok")
        if not isinstance(ok, bool):
            raise FrameError("command_reply needs a boolean ok")
        return CommandReply(reply_id, ok, body.get("result"), _optional_str(body, "reason"),
                            _optional_str(body, "message"))
    raise FrameError(f"unknown kind {kind!r}")


def command_request(*, request_id: str, command_id: str, args: Any, agent_name: str | None,
                    agent_version: str | None, deadline_ms: int) -> str:
    """`deadline_ms`: when the daemon stops waiting for the reply, in ms since the epoch."""
    return json.dumps({
        "kind": "command_request",
        "id": request_id,
        "command_id": command_id,
        "args": args,
        "agent": {"name": agent_name, "version": agent_version},
        "deadline_ms": deadline_ms,
    })


__all__ = [
    "CommandReply",
    "CommandsChanged",
    "Focused",
    "ForegroundChanged",
    "FrameError",
    "Hello",
    "SessionsChanged",
    "WindowFrame",
    "command_request",
    "parse_window_frame",
]
