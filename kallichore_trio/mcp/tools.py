"""The MCP tools: their definitions, and how their results are shaped for an agent. Pure.

The definitions are shared by the HTTP server (server.py) and the stdio relay, which lists them
even while the daemon is offline. docs/mcp.md describes each tool.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from mcp import types

from kallichore_trio.core.history import clip

#: Seconds a code tool waits when the agent gives no `timeout_s`, and the most it may ask for.
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 600.0
#: The text of one tool result, in UTF-8 bytes; longer text keeps its head and tail.
RESULT_TEXT_BYTES = 32 * 1024
#: Images per result, and the largest one (base64 bytes) sent as an image.
MAX_IMAGES = 8
MAX_IMAGE_BYTES = 4 * 1024 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

_SESSION_ID = {"type": "string", "description": "The session to use (see list_sessions)."}
_TIMEOUT = {"type": "number", "exclusiveMinimum": 0,
            "description": f"Seconds to wait for the result (default {DEFAULT_TIMEOUT_S:g}, "
                           f"at most {MAX_TIMEOUT_S:g}); past it the kernel is interrupted."}

TOOLS: list[types.Tool] = [
    types.Tool(
        name="list_sessions",
        description="List the interpreter sessions (consoles and notebooks) of this Positron "
                    "workspace: id, name, language, status, mode, working directory, and "
                    "whether it is the session in the foreground.",
        inputSchema={"type": "object", "properties": {}, "additionalProperties": False},
    ),
    types.Tool(
        name="execute_code",
        description="Run code in a session, as if typed in its console: the user sees it, "
                    "it is recorded in the session's history under your name, and it waits "
                    "its turn behind code already queued. Returns the output, the result, "
                    "errors with their traceback, and plots as images.",
        inputSchema={"type": "object", "required": ["session_id", "code"],
                     "properties": {"session_id": _SESSION_ID,
                                    "code": {"type": "string", "description": "The code."},
                                    "timeout_s": _TIMEOUT}},
    ),
    types.Tool(
        name="evaluate_code",
        description="Evaluate code in a session without adding it to the kernel's input "
                    "history, e.g. to inspect a variable. Refused while the kernel is busy, "
                    "unless `wait` is true (then it waits its turn).",
        inputSchema={"type": "object", "required": ["session_id", "code"],
                     "properties": {"session_id": _SESSION_ID,
                                    "code": {"type": "string", "description": "The code."},
                                    "wait": {"type": "boolean", "default": False,
                                             "description": "Wait for a busy kernel."},
                                    "timeout_s": _TIMEOUT}},
    ),
    types.Tool(
        name="interrupt_session",
        description="Interrupt what a session is running (like Ctrl+C in its console); code "
                    "queued behind it is dropped.",
        inputSchema={"type": "object", "required": ["session_id"],
                     "properties": {"session_id": _SESSION_ID}},
    ),
    types.Tool(
        name="list_positron_commands",
        description="List the Positron IDE commands this workspace's window lets agents run, "
                    "with their arguments.",
        inputSchema={"type": "object", "properties": {}, "additionalProperties": False},
    ),
    types.Tool(
        name="run_positron_command",
        description="Ask the Positron window of this workspace to run one of its commands "
                    "(see list_positron_commands) and return its result.",
        inputSchema={"type": "object", "required": ["command_id"],
                     "properties": {"command_id": {"type": "string"},
                                    "args": {"description": "The command's arguments, as "
                                                            "list_positron_commands describes."}}},
    ),
]

TOOL_NAMES = frozenset(tool.name for tool in TOOLS)


class ToolFailure(Exception):
    """A tool call that failed in a way the agent can act on; the message tells it how."""


def timeout_seconds(value: Any) -> float:
    """The wait for `timeout_s`: the default when absent, at most MAX_TIMEOUT_S."""
    if value is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolFailure("timeout_s must be a number of seconds")
    if not (value > 0 and math.isfinite(value)):
        raise ToolFailure("timeout_s must be a positive number of seconds")
    return min(float(value), MAX_TIMEOUT_S)


def plain_text(text: str) -> str:
    """Text without terminal colour codes (IPython colours its tracebacks)."""
    return _ANSI.sub("", text)


def _image(data: dict[str, Any]) -> tuple[str, str] | None:
    for mime in IMAGE_TYPES:
        value = data.get(mime)
        if isinstance(value, list):
            value = "".join(v for v in value if isinstance(v, str))
        if isinstance(value, str) and value:
            return mime, value.replace("\n", "")
    return None


def _valid_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _plain(data: dict[str, Any]) -> str | None:
    value = data.get("text/plain")
    if isinstance(value, list):
        value = "".join(v for v in value if isinstance(v, str))
    return value if isinstance(value, str) else None


def execution_content(result: dict[str, Any]) -> tuple[list[types.ContentBlock], bool]:
    """An `/execute` result (core.collector's `result()`) as tool content, and whether it is an
    error. Text comes first (streams, results, errors in order, clipped to RESULT_TEXT_BYTES),
    then the images."""
    pieces: list[str] = []
    images: list[types.ContentBlock] = []

    def add_data(data: Any) -> None:
        if not isinstance(data, dict):
            return
        image = _image(data)
        if image is not None and len(images) < MAX_IMAGES and len(image[1]) <= MAX_IMAGE_BYTES \
                and _valid_base64(image[1]):
            images.append(types.ImageContent(type="image", data=image[1], mimeType=image[0]))
            return
        plain = _plain(data)
        if plain is not None:
            pieces.append(plain + "\n")
        elif data:
            pieces.append(f"[output of type {', '.join(sorted(data))}]\n")

    for item in result.get("output", []):
        kind = item.get("type")
        if kind == "stream":
            pieces.append(item.get("text", ""))
        elif kind == "display_data":
            add_data(item.get("data"))
        elif kind == "error":
            pieces.append(_error_text(item.get("error_name"), item.get("error_message"),
                                      item.get("error_traceback")))
    add_data(result.get("data"))
    is_error = result.get("status") != "ok"
    if is_error and not any(i.get("type") == "error" for i in result.get("output", [])):
        pieces.append(_error_text(result.get("error_name"), result.get("error_message"),
                                  result.get("error_traceback")))
    if is_error and result.get("error_name") == "KeyboardInterrupt":
        pieces.insert(0, "The execution was interrupted.\n")
    text = plain_text("".join(pieces))
    if not text and not images:
        text = "(no output)" if not is_error else "The execution failed without output."
    content: list[types.ContentBlock] = []
    if text:
        content.append(types.TextContent(type="text", text=clip(text, RESULT_TEXT_BYTES)[0]))
    return content + images, is_error


def _error_text(name: Any, message: Any, traceback: Any) -> str:
    lines = [t for t in traceback if isinstance(t, str)] if isinstance(traceback, list) else []
    if lines:
        return "\n".join(lines) + "\n"
    return f"{name or 'Error'}: {message or ''}\n"


def json_content(value: Any) -> list[types.ContentBlock]:
    """A JSON value as one text block, clipped to RESULT_TEXT_BYTES."""
    text = json.dumps(value, indent=2, default=str)
    return [types.TextContent(type="text", text=clip(text, RESULT_TEXT_BYTES)[0])]


def error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                isError=True)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_TIMEOUT_S",
    "RESULT_TEXT_BYTES",
    "TOOLS",
    "TOOL_NAMES",
    "ToolFailure",
    "error_result",
    "execution_content",
    "json_content",
    "plain_text",
    "timeout_seconds",
]
