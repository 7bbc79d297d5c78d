"""Clipping text for history entries (docs/differences.md, "Execute and history"). Pure.

Sizes are UTF-8 bytes, and a cut never splits a character. Clipped text keeps its head and its
tail with `omitted_marker(N)` between them, N being the bytes left out, and the result, marker
included, fits the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: What `input`, `output` and the error of a history entry are each clipped to.
CLIP_BYTES = 4096
#: The error name is cut (not clipped in the middle) to this.
ERROR_NAME_BYTES = 256
#: The error message keeps head and tail within this; the traceback gets the rest of the error's
#: share, from its last entry backwards.
ERROR_MESSAGE_BYTES = 1024


def omitted_marker(n: int) -> str:
    return f"\n[... {n} bytes omitted ...]\n"


def _utf8(text: str) -> bytes:
    # surrogatepass: JSON may carry a lone surrogate (as a \u escape); keep it rather than fail.
    return text.encode("utf-8", "surrogatepass")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def _head_end(data: bytes, n: int) -> int:
    """The largest cut <= n that does not split a UTF-8 character."""
    n = max(0, min(n, len(data)))
    while 0 < n < len(data) and data[n] & 0xC0 == 0x80:
        n -= 1
    return n


def _tail_start(data: bytes, start: int) -> int:
    """The smallest cut >= start that does not split a UTF-8 character."""
    start = max(0, min(start, len(data)))
    while start < len(data) and data[start] & 0xC0 == 0x80:
        start += 1
    return start


def clip(head: str, limit: int = CLIP_BYTES, *, gap: int = 0, tail: str = "") -> tuple[str, bool]:
    """`head` clipped to `limit` bytes keeping its start and its end; returns (text, clipped).

    With `gap` > 0 the text is `head`, then `gap` bytes that are not available (they were
    never kept), then `tail`: the start is kept from `head`, the end from `tail`, and N counts
    the gap too.
    """
    hb, tb = _utf8(head), _utf8(tail)
    if gap <= 0:
        hb, tb, gap = hb + tb, b"", 0
        if len(hb) <= limit:
            return _text(hb), False
    total = len(hb) + gap + len(tb)
    # The marker's N is at most `total`, so reserving room for that many digits always fits.
    room = max(0, limit - len(_utf8(omitted_marker(total))))
    if gap == 0:
        head_part = hb[: _head_end(hb, room // 2)]
        tail_part = hb[_tail_start(hb, len(hb) - (room - room // 2)) :]
    else:
        keep_tail = min(len(tb), room - min(len(hb), room // 2))
        keep_head = min(len(hb), room - keep_tail)
        head_part = hb[: _head_end(hb, keep_head)]
        tail_part = tb[_tail_start(tb, len(tb) - keep_tail) :]
    omitted = total - len(head_part) - len(tail_part)
    return _text(head_part) + omitted_marker(omitted) + _text(tail_part), True


def clip_head(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to its first `limit` bytes (no marker); returns (text, cut)."""
    data = _utf8(text)
    if len(data) <= limit:
        return text, False
    return _text(data[: _head_end(data, limit)]), True


def clip_traceback(traceback: Sequence[str], limit: int) -> tuple[list[str], bool]:
    """The last entries of `traceback` that fit `limit` bytes, after a marker entry saying how
    many bytes of earlier entries were left out. When even the last entry does not fit, it is
    clipped itself (head and tail)."""
    sizes = [len(_utf8(line)) for line in traceback]
    if sum(sizes) <= limit:
        return list(traceback), False
    marker = omitted_marker(sum(sizes)).strip("\n")
    room = limit - len(_utf8(marker))
    kept: list[str] = []
    used = 0
    for line, size in zip(reversed(traceback), reversed(sizes), strict=True):
        if used + size > room:
            break
        kept.append(line)
        used += size
    if not kept:
        last, _ = clip(traceback[-1], max(0, limit))
        return [last], True
    kept.reverse()
    dropped = sum(sizes) - used
    return [omitted_marker(dropped).strip("\n"), *kept], True


def clip_error(
    name: str, message: str, traceback: Sequence[str], limit: int = CLIP_BYTES
) -> tuple[dict[str, Any], bool]:
    """A history entry's `error`: name cut to ERROR_NAME_BYTES, message clipped to
    ERROR_MESSAGE_BYTES, and the traceback's last entries in what is left of `limit`."""
    name, cut_name = clip_head(name, ERROR_NAME_BYTES)
    message, cut_message = clip(message, ERROR_MESSAGE_BYTES)
    left = limit - len(_utf8(name)) - len(_utf8(message))
    lines, cut_lines = clip_traceback(traceback, left)
    return (
        {"name": name, "message": message, "traceback": lines},
        cut_name or cut_message or cut_lines,
    )
