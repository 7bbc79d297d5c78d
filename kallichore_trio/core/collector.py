"""ExecutionCollector: what one execute_request produced, for `/execute` and for the history.

It is fed the messages whose parent is the request (stream, display_data, execute_result and
error from iopub; execute_reply from shell; the status messages) and is `done` once both the
execute_reply and the `idle` status have come, in either order. Then `result()` is the
`/execute` reply body and `history_entry()` the history entry (docs/differences.md, "Execute
and history").

Feeding is on the daemon's message path, so it costs little: content is kept as the raw JSON
the kernel sent and decoded only when a result or an entry is asked for, and what is kept is
bounded by a `Window`: the first messages up to `head_bytes` of content and the last up to
`tail_bytes`. Messages that fall between the two are counted (messages and content bytes), not
kept; `result()` and `history_entry()` then say `[... N bytes omitted ...]` there, N counting the
dropped messages by the size of their JSON content. Content may also be given already parsed (a
mapping), for callers that have it so.

Pure: no I/O, no clock (the caller gives the timestamp).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from kallichore_trio.core.history import clip, clip_error, omitted_marker

Raw = bytes | str | Mapping[str, Any]
Decoded = list[tuple[str, dict[str, Any]]]

#: iopub outputs kept (in order) in the window.
_OUTPUTS = frozenset({"stream", "display_data", "execute_result", "error"})
_STREAM_NAMES = frozenset({"stdout", "stderr"})


@attrs.frozen
class Window:
    """How much output content (JSON bytes) a collector keeps from the start and the end."""

    head_bytes: int
    tail_bytes: int


#: An `/execute` reply: up to 8 MiB of output content kept, half from each end.
REPLY_WINDOW = Window(head_bytes=4 * 1024 * 1024, tail_bytes=4 * 1024 * 1024)
#: A history entry only: its output is clipped to 4 KiB anyway, so keep a little more than that
#: from each end (JSON is at least as long as the text it carries).
HISTORY_WINDOW = Window(head_bytes=16 * 1024, tail_bytes=16 * 1024)


def _size(raw: Raw) -> int:
    if isinstance(raw, bytes | str):
        return len(raw)
    return len(json.dumps(raw, default=str))


def _load(raw: Raw) -> dict[str, Any]:
    """Content as a dict; `{}` for an empty frame or one that is not a JSON object."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return {}
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _lines(value: Any) -> list[str]:
    return [_str(v) for v in value] if isinstance(value, list) else []


def _plain(data: Any) -> str | None:
    """An output's `text/plain` (nbformat allows a list of lines), or None."""
    if not isinstance(data, dict):
        return None
    plain = data.get("text/plain")
    if isinstance(plain, list):
        return "".join(_str(p) for p in plain)
    return plain if isinstance(plain, str) else None


class ExecutionCollector:
    """Follows one execute_request (see the module docstring)."""

    __slots__ = (
        "_error",
        "_head",
        "_head_open",
        "_head_size",
        "_reply",
        "_result",
        "_tail",
        "_tail_size",
        "_window",
        "agent",
        "code",
        "idle",
        "omitted_bytes",
        "omitted_messages",
        "replied",
        "source",
    )

    def __init__(
        self,
        code: str,
        *,
        source: str | None = None,
        agent: str | None = None,
        window: Window = REPLY_WINDOW,
    ) -> None:
        self.code = code
        self.source = source
        self.agent = agent
        self._window = window
        self._head: list[tuple[str, Raw]] = []
        self._head_size = 0
        self._head_open = True
        self._tail: deque[tuple[str, Raw, int]] = deque()
        self._tail_size = 0
        self.omitted_messages = 0
        self.omitted_bytes = 0
        self._result: Raw | None = None  # the execute_result, for `data`
        self._error: Raw | None = None  # the last error output
        self._reply: dict[str, Any] | None = None
        self.replied = False
        self.idle = False

    def __repr__(self) -> str:
        return (f"<ExecutionCollector replied={self.replied} idle={self.idle} "
                f"kept={len(self._head) + len(self._tail)} omitted={self.omitted_messages}>")

    # ---- feeding (the message path) ------------------------------------------------------

    def feed(self, msg_type: str, content: Raw) -> None:
        """One message whose parent is this request; other message types are ignored."""
        if msg_type in _OUTPUTS:
            self._keep(msg_type, content)
            if msg_type == "execute_result":
                self._result = content
            elif msg_type == "error":
                self._error = content
        elif msg_type == "execute_reply":
            self._reply = _load(content)
            self.replied = True
        elif msg_type == "status" and _load(content).get("execution_state") == "idle":
            self.idle = True

    def _keep(self, msg_type: str, content: Raw) -> None:
        size = _size(content)
        window = self._window
        if self._head_open:
            if self._head_size + size <= window.head_bytes:
                self._head.append((msg_type, content))
                self._head_size += size
                return
            self._head_open = False  # from here on, output goes to the tail
        tail = self._tail
        tail.append((msg_type, content, size))
        self._tail_size += size
        while self._tail_size > window.tail_bytes:
            _, _, dropped = tail.popleft()
            self._tail_size -= dropped
            self.omitted_messages += 1
            self.omitted_bytes += dropped

    @property
    def done(self) -> bool:
        """Both the execute_reply and the idle status have come."""
        return self.replied and self.idle

    # ---- results (decoded here, once asked for) ------------------------------------------

    def _decoded(self) -> tuple[Decoded, Decoded]:
        head = [(t, _load(c)) for t, c in self._head]
        tail = [(t, _load(c)) for t, c, _ in self._tail]
        return head, tail

    @property
    def status(self) -> str:
        """`ok`, or `error` for any other reply status (error, aborted) or none at all."""
        reply = self._reply or {}
        return "ok" if reply.get("status") == "ok" else "error"

    def _error_fields(self) -> tuple[str, str, list[str]] | None:
        """(name, message, traceback) when the execution failed: from the error output, else
        from the reply; an aborted request (an earlier one failed) has neither."""
        if self.status == "ok":
            return None
        source = _load(self._error) if self._error is not None else (self._reply or {})
        if "ename" not in source and (self._reply or {}).get("status") == "aborted":
            return ("ExecutionAborted",
                    "the kernel aborted this request because an earlier one failed", [])
        return _str(source.get("ename")), _str(source.get("evalue")), _lines(
            source.get("traceback"))

    def result(self) -> dict[str, Any]:
        """The `/execute` reply body (its schema is `executeResponse`, see models.py)."""
        head, tail = self._decoded()
        output: list[dict[str, Any]] = []
        if self.omitted_messages:
            _add_outputs(output, head)
            # An item of its own: the tail's first stream chunk does not join it.
            output.append({"type": "stream", "stream_name": "stdout",
                           "text": omitted_marker(self.omitted_bytes)})
            tail_output: list[dict[str, Any]] = []
            _add_outputs(tail_output, tail)
            output += tail_output
        else:
            _add_outputs(output, head + tail)
        reply = self._reply or {}
        count = reply.get("execution_count")
        body: dict[str, Any] = {
            "status": self.status,
            "execution_count": count if isinstance(count, int) and not isinstance(
                count, bool) else 0,
            "output": output,
        }
        if self._result is not None:
            data = _load(self._result).get("data")
            if isinstance(data, dict):
                body["data"] = data
        error = self._error_fields()
        if error is not None:
            body["error_name"], body["error_message"], body["error_traceback"] = error
        return body

    def history_entry(self, timestamp: int) -> dict[str, Any]:
        """The history entry; `timestamp` is when the request was sent (ms since the epoch)."""
        head, tail = self._decoded()
        code, cut_input = clip(self.code)
        output, cut_output = clip(
            "".join(_history_text(head)), gap=self.omitted_bytes, tail="".join(_history_text(tail))
        )
        entry: dict[str, Any] = {"input": code, "output": output}
        cut_error = False
        error = self._error_fields()
        if error is not None:
            entry["error"], cut_error = clip_error(*error)
        entry["timestamp"] = timestamp
        if self.source is not None:
            entry["source"] = self.source
        if self.agent is not None:
            entry["agent"] = self.agent
        entry["truncated"] = cut_input or cut_output or cut_error
        return entry


def _add_outputs(output: list[dict[str, Any]], messages: Decoded) -> None:
    """Reply items in order; consecutive chunks of one stream are joined into one item, and the
    execute_result is left out (it is the reply's `data`)."""
    pieces: list[str] = []  # the chunks of the stream item being built (output[-1])

    def end_stream() -> None:
        if pieces:
            output[-1]["text"] = "".join(pieces)
            pieces.clear()

    for msg_type, content in messages:
        if msg_type == "stream":
            name = content.get("name")
            name = name if name in _STREAM_NAMES else "stdout"
            if not (pieces and output[-1]["stream_name"] == name):
                end_stream()
                output.append({"type": "stream", "stream_name": name, "text": ""})
            pieces.append(_str(content.get("text")))
        elif msg_type == "display_data":
            end_stream()
            data = content.get("data")
            item: dict[str, Any] = {"type": "display_data",
                                    "data": data if isinstance(data, dict) else {}}
            metadata = content.get("metadata")
            if isinstance(metadata, dict) and metadata:
                item["metadata"] = metadata
            output.append(item)
        elif msg_type == "error":
            end_stream()
            output.append({"type": "error", "error_name": _str(content.get("ename")),
                           "error_message": _str(content.get("evalue")),
                           "error_traceback": _lines(content.get("traceback"))})
    end_stream()


def _history_text(messages: Decoded) -> Iterable[str]:
    """Stream text as it came; each execute_result and display_data as its text/plain (or a
    placeholder naming its MIME types) followed by a newline. Errors are the entry's `error`."""
    for msg_type, content in messages:
        if msg_type == "stream":
            yield _str(content.get("text"))
        elif msg_type in ("execute_result", "display_data"):
            data = content.get("data")
            plain = _plain(data)
            if plain is not None:
                yield plain + "\n"
            elif isinstance(data, dict) and data:
                yield f"[non-text output: {', '.join(data)}]\n"
