"""The execution collector and history clipping (kallichore_trio/core), byte for byte, no kernel."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kallichore_trio import models
from kallichore_trio.core import (
    CLIP_BYTES,
    ExecutionCollector,
    Window,
    clip,
    clip_error,
    clip_head,
    omitted_marker,
)
from kallichore_trio.core.history import clip_traceback

Message = tuple[str, Any]


def raw(content: dict[str, Any]) -> bytes:
    """Content as a kernel sends it (compact JSON bytes)."""
    return json.dumps(content, separators=(",", ":")).encode()


def stream(text: str, name: str = "stdout") -> Message:
    return "stream", raw({"name": name, "text": text})


BUSY: Message = ("status", raw({"execution_state": "busy"}))
IDLE: Message = ("status", raw({"execution_state": "idle"}))
INPUT: Message = ("execute_input", raw({"code": "ignored", "execution_count": 1}))


def reply(status: str = "ok", count: int = 1, **extra: Any) -> Message:
    return "execute_reply", raw({"status": status, "execution_count": count, **extra})


def run(code: str, messages: list[Message], window: Window | None = None,
        **attribution: Any) -> ExecutionCollector:
    collector = (ExecutionCollector(code, window=window, **attribution) if window
                 else ExecutionCollector(code, **attribution))
    for msg_type, content in messages:
        collector.feed(msg_type, content)
    return collector


TRACEBACK = ["\x1b[0;31mZeroDivisionError\x1b[0m Traceback", "----> 1 1/0",
             "ZeroDivisionError: division by zero"]
ERROR = {"ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": TRACEBACK}

CASES: list[tuple[str, str, list[Message], dict[str, Any], dict[str, Any]]] = [
    (
        "print, then a value: chunks of one stream are joined, the result is hoisted",
        "print(1)\nprint(2)\n1+1",
        [BUSY, INPUT, stream("1\n"), stream("2\n"),
         ("execute_result", raw({"data": {"text/plain": "2", "text/html": "<b>2</b>"},
                                 "metadata": {}, "execution_count": 4})),
         reply(count=4), IDLE],
        {"status": "ok", "execution_count": 4,
         "output": [{"type": "stream", "stream_name": "stdout", "text": "1\n2\n"}],
         "data": {"text/plain": "2", "text/html": "<b>2</b>"}},
        {"input": "print(1)\nprint(2)\n1+1", "output": "1\n2\n2\n", "timestamp": 1000,
         "truncated": False},
    ),
    (
        "an error: from the error output, in the output list and on top",
        "print('a', file=sys.stderr); 1/0",
        [BUSY, stream("a\n", "stderr"), ("error", raw(ERROR)),
         reply("error", 2, **ERROR), IDLE],
        {"status": "error", "execution_count": 2,
         "output": [{"type": "stream", "stream_name": "stderr", "text": "a\n"},
                    {"type": "error", "error_name": "ZeroDivisionError",
                     "error_message": "division by zero", "error_traceback": TRACEBACK}],
         "error_name": "ZeroDivisionError", "error_message": "division by zero",
         "error_traceback": TRACEBACK},
        {"input": "print('a', file=sys.stderr); 1/0", "output": "a\n",
         "error": {"name": "ZeroDivisionError", "message": "division by zero",
                   "traceback": TRACEBACK},
         "timestamp": 1000, "truncated": False},
    ),
    (
        "display data: text/plain, else a placeholder naming the MIME types; metadata kept",
        "display(x); display(img)",
        [stream("before "), ("display_data", raw({"data": {"text/plain": ["x", "y"]},
                                                  "metadata": {}, "transient": {}})),
         ("display_data", raw({"data": {"image/png": "iVBO", "image/svg+xml": "<svg/>"},
                               "metadata": {"image/png": {"width": 4}}})),
         stream("after\n"), IDLE, reply(count=7)],
        {"status": "ok", "execution_count": 7,
         "output": [{"type": "stream", "stream_name": "stdout", "text": "before "},
                    {"type": "display_data", "data": {"text/plain": ["x", "y"]}},
                    {"type": "display_data",
                     "data": {"image/png": "iVBO", "image/svg+xml": "<svg/>"},
                     "metadata": {"image/png": {"width": 4}}},
                    {"type": "stream", "stream_name": "stdout", "text": "after\n"}]},
        {"input": "display(x); display(img)",
         "output": "before xy\n[non-text output: image/png, image/svg+xml]\nafter\n",
         "timestamp": 1000, "truncated": False},
    ),
    (
        "interleaved streams stay apart; unknown message types and stream names",
        "",
        [stream("o1"), stream("e1", "stderr"), stream("o2"), stream("?", "stdlog"),
         ("clear_output", raw({"wait": False})), ("comm_msg", raw({})), reply(), IDLE],
        {"status": "ok", "execution_count": 1,
         "output": [{"type": "stream", "stream_name": "stdout", "text": "o1"},
                    {"type": "stream", "stream_name": "stderr", "text": "e1"},
                    {"type": "stream", "stream_name": "stdout", "text": "o2?"}]},
        {"input": "", "output": "o1e1o2?", "timestamp": 1000, "truncated": False},
    ),
    (
        "an aborted request (an earlier one failed) is an error without an error output",
        "2",
        [reply("aborted", 0), IDLE],
        {"status": "error", "execution_count": 0, "output": [],
         "error_name": "ExecutionAborted",
         "error_message": "the kernel aborted this request because an earlier one failed",
         "error_traceback": []},
        {"input": "2", "output": "",
         "error": {"name": "ExecutionAborted",
                   "message": "the kernel aborted this request because an earlier one failed",
                   "traceback": []},
         "timestamp": 1000, "truncated": False},
    ),
    (
        "an error only in the reply; a reply without a count; content given as a mapping",
        "raise E",
        [("execute_reply", {"status": "error", "ename": "E", "evalue": "boom",
                            "traceback": ["t1", 2]}),
         ("status", {"execution_state": "idle"})],
        {"status": "error", "execution_count": 0, "output": [],
         "error_name": "E", "error_message": "boom", "error_traceback": ["t1", "2"]},
        {"input": "raise E", "output": "",
         "error": {"name": "E", "message": "boom", "traceback": ["t1", "2"]},
         "timestamp": 1000, "truncated": False},
    ),
]


@pytest.mark.parametrize(("code", "messages", "result", "entry"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_collector_results(code: str, messages: list[Message], result: dict[str, Any],
                           entry: dict[str, Any]) -> None:
    collector = run(code, messages)
    assert collector.done
    assert json.dumps(collector.result()) == json.dumps(result)  # byte for byte, key order too
    assert json.dumps(collector.history_entry(1000)) == json.dumps(entry)
    # The wire shapes are the schemas' (strict converter, exact names).
    assert models.dump(models.converter.structure(result, models.ExecuteResponse)) == result
    assert models.dump(models.converter.structure(entry, models.HistoryEntry)) == entry


@pytest.mark.parametrize(
    ("messages", "done"),
    [
        ([reply()], False),
        ([IDLE], False),
        ([BUSY, reply()], False),
        ([IDLE, reply()], True),
        ([reply(), IDLE], True),
        ([reply(), ("status", b"")], False),
        ([reply(), ("status", b"not json")], False),
    ],
)
def test_done_needs_the_reply_and_the_idle_status(messages: list[Message], done: bool) -> None:
    assert run("x", messages).done is done


def test_attribution_goes_into_the_entry() -> None:
    entry = run("x", [reply(), IDLE], source="agent", agent="claude").history_entry(5)
    assert json.dumps(entry) == json.dumps(
        {"input": "x", "output": "", "timestamp": 5, "source": "agent", "agent": "claude",
         "truncated": False})


def test_output_between_the_windows_is_counted_not_kept() -> None:
    # Each message's content is 35 bytes: the head keeps the first, the tail the last.
    messages = [stream(f"line {i}\n") for i in range(10)]
    assert {len(c) for _, c in messages} == {35}
    collector = run("loop", [*messages, reply(), IDLE], window=Window(60, 60))
    assert (collector.omitted_messages, collector.omitted_bytes) == (8, 280)
    assert collector.result()["output"] == [
        {"type": "stream", "stream_name": "stdout", "text": "line 0\n"},
        {"type": "stream", "stream_name": "stdout", "text": "\n[... 280 bytes omitted ...]\n"},
        {"type": "stream", "stream_name": "stdout", "text": "line 9\n"},
    ]
    entry = collector.history_entry(1)
    assert entry["output"] == "line 0\n\n[... 280 bytes omitted ...]\nline 9\n"
    assert entry["truncated"] is True


def test_a_message_larger_than_a_window_is_not_kept() -> None:
    big = stream("x" * 500)
    collector = run("", [stream("a"), big, stream("b"), reply(), IDLE], window=Window(100, 100))
    assert collector.omitted_messages == 1
    assert [o["text"] for o in collector.result()["output"]] == [
        "a", omitted_marker(len(big[1])), "b"]


def test_history_output_is_clipped_to_4_kib_keeping_head_and_tail() -> None:
    text = "".join(f"{i:05d}\n" for i in range(2000))  # 12,000 bytes
    entry = run("x" * 5000, [stream(text), reply(), IDLE]).history_entry(1)
    assert entry["truncated"] is True
    marker = "\n[... 7935 bytes omitted ...]\n"
    assert entry["output"] == text[:2032] + marker + text[-2033:]
    assert entry["input"] == "x" * 2033 + "\n[... 934 bytes omitted ...]\n" + "x" * 2033
    assert len(entry["output"].encode()) <= CLIP_BYTES


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("short",), ("short", False)),
        (("a" * 4096,), ("a" * 4096, False)),
        (("0123456789" * 10, 40), ("01234\n[... 89 bytes omitted ...]\n456789", True)),
        # A cut never splits a character (é is two bytes).
        (("é" * 30, 39), ("éé\n[... 50 bytes omitted ...]\nééé", True)),
        (("head-text", 40, 1000, "tail-text"),
         ("head-\n[... 1008 bytes omitted ...]\n-text", True)),
        # A short head leaves its room to the tail.
        (("ab", 40, 1000, "0123456789"), ("ab\n[... 1002 bytes omitted ...]\n23456789", True)),
        # With a gap the text is clipped even when what is left would fit.
        (("a", 4096, 3, "b"), ("a\n[... 3 bytes omitted ...]\nb", True)),
        # A lone surrogate (legal in JSON) is carried, not an error.
        (("\ud800" * 20, 40),
         ("\ud800\ud800\n[... 48 bytes omitted ...]\n\ud800\ud800", True)),
    ],
)
def test_clip(args: tuple[Any, ...], expected: tuple[str, bool]) -> None:
    text, *rest = args
    limit = rest[0] if rest else CLIP_BYTES
    gap, tail = (rest[1], rest[2]) if len(rest) > 1 else (0, "")
    result = clip(text, limit, gap=gap, tail=tail)
    assert result == expected
    assert len(result[0].encode("utf-8", "surrogatepass")) <= limit


@pytest.mark.parametrize(
    ("traceback", "limit", "expected"),
    [
        (["a" * 10, "b" * 10], 20, (["a" * 10, "b" * 10], False)),
        (["a" * 30, "b" * 30, "c" * 30], 90, (["a" * 30, "b" * 30, "c" * 30], False)),
        (["a" * 30, "b" * 30, "c" * 30], 70, (["[... 60 bytes omitted ...]", "c" * 30], True)),
        # Not even the last entry fits: it is clipped itself.
        (["a" * 10, "c" * 100], 40, (["ccccc\n[... 89 bytes omitted ...]\ncccccc"], True)),
    ],
)
def test_the_traceback_keeps_its_last_lines(
    traceback: list[str], limit: int, expected: tuple[list[str], bool]
) -> None:
    assert clip_traceback(traceback, limit) == expected


def test_clip_error_caps_the_name_and_shares_4_kib() -> None:
    lines = [f"frame {i:03d} " + "." * 90 for i in range(100)]  # 100 bytes each
    error, cut = clip_error("N" * 300, "m" * 2000, lines)
    assert cut is True
    assert error["name"] == "N" * 256
    assert error["message"] == "m" * 497 + "\n[... 1006 bytes omitted ...]\n" + "m" * 497
    # What the name and message leave (4096 - 256 - 1024 = 2816) holds the marker and the
    # last 27 frames.
    assert error["traceback"] == ["[... 7300 bytes omitted ...]", *lines[-27:]]
    size = sum(len(v.encode()) for v in (error["name"], error["message"], *error["traceback"]))
    assert size <= CLIP_BYTES
    assert clip_error("E", "m", ["t"]) == ({"name": "E", "message": "m", "traceback": ["t"]},
                                            False)


def test_clip_head() -> None:
    assert clip_head("é" * 200, 255) == ("é" * 127, True)
    assert clip_head("abc", 3) == ("abc", False)
