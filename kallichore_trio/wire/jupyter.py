"""Jupyter ZeroMQ wire format: multipart frames <-> messages, HMAC-SHA256 signing.

Sans-IO: no sockets here. The ZeroMQ owner tasks hand us lists of frames and send what
``build_frames`` returns. Incoming messages are decoded only as far as the supervisor needs
(header and parent header); metadata and content stay raw JSON bytes so they can be relayed to
clients without a decode/encode round trip (see ``kallichore.relay_frame``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

DELIMITER = b"<IDS|MSG>"

# A parent-header frame shorter than this is treated as "no parent" (it can only be `{}` or
# whitespace); Kallichore uses the same 5-byte threshold.
_MIN_PARENT_LEN = 5

_HEADER_FIELDS = ("msg_id", "msg_type", "session", "username", "date", "version")

# Frames after the delimiter before the buffers: signature, header, parent, metadata, content.
_FIXED_FRAMES = 5


class WireError(Exception):
    """A frame sequence from a kernel that cannot be accepted (the message is dropped)."""


class MissingDelimiter(WireError):
    """No ``<IDS|MSG>`` frame, or too few frames after it."""


class InvalidSignature(WireError):
    """A non-empty signature that does not match the HMAC of the message."""


class MalformedHeader(WireError):
    """The header (or a non-empty parent header) is not JSON or lacks required fields."""


class Signer:
    """HMAC-SHA256 over header, parent, metadata and content, as the Jupyter spec requires.

    An empty key means the connection is unsigned: ``sign`` returns ``b""`` and ``verify``
    accepts anything. With a key, an *empty* signature from the kernel is still accepted
    without verification (Kallichore does this; some kernels never sign their messages).
    """

    __slots__ = ("_base", "_key")

    def __init__(self, key: bytes) -> None:
        self._key = key
        # Keying HMAC (hashing the padded key) costs as much as a small message; do it once
        # and copy the keyed state for each message.
        self._base = hmac.new(key, digestmod=hashlib.sha256) if key else None

    @property
    def key(self) -> bytes:
        return self._key

    def sign(self, header: bytes, parent: bytes, metadata: bytes, content: bytes) -> bytes:
        """Lowercase hex digest as bytes, or ``b""`` when there is no key."""
        if self._base is None:
            return b""
        mac = self._base.copy()
        mac.update(header)
        mac.update(parent)
        mac.update(metadata)
        mac.update(content)
        return mac.hexdigest().encode("ascii")

    def verify(
        self, signature: bytes, header: bytes, parent: bytes, metadata: bytes, content: bytes
    ) -> bool:
        if self._base is None or not signature:
            return True
        expected = self.sign(header, parent, metadata, content)
        return hmac.compare_digest(expected, signature)


@attrs.frozen
class KernelMessage:
    """A message received from a kernel, decoded only as far as the supervisor needs."""

    identities: tuple[bytes, ...]
    header: dict[str, Any]
    parent_header: dict[str, Any] | None
    metadata: bytes  # raw JSON, deliberately not parsed
    content: bytes  # raw JSON, deliberately not parsed
    buffers: tuple[bytes, ...] = ()

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]

    @property
    def msg_type(self) -> str:
        return self.header["msg_type"]

    @property
    def parent_msg_id(self) -> str | None:
        return None if self.parent_header is None else self.parent_header["msg_id"]

    @property
    def parent_msg_type(self) -> str | None:
        return None if self.parent_header is None else self.parent_header["msg_type"]

    def content_json(self) -> Any:
        """Parse the content on demand (only status messages and a few replies need it)."""
        return json.loads(self.content) if self.content else {}


_decode_json = json.JSONDecoder().decode


def _load_object(frame: bytes, what: str) -> dict[str, Any]:
    try:
        # Decoding UTF-8 ourselves skips json.loads' encoding sniffing (Jupyter is UTF-8).
        obj = _decode_json(frame.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise MalformedHeader(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedHeader(f"{what} is not a JSON object (got {type(obj).__name__})")
    return obj


def _check_ids(obj: dict[str, Any], what: str) -> None:
    # The supervisor routes on msg_id/msg_type, so these two must really be strings.
    for name in ("msg_id", "msg_type"):
        if not isinstance(obj.get(name), str):
            raise MalformedHeader(f"{what} lacks a string {name!r}")


def parse_kernel_frames(frames: Sequence[bytes], signer: Signer) -> KernelMessage:
    """Decode one multipart message from a kernel socket.

    Raises ``MissingDelimiter``, ``InvalidSignature`` or ``MalformedHeader``. The header must
    have all six Jupyter fields; a parent header of 5 bytes or more must parse and carry
    msg_id and msg_type (shorter means ``{}``: no parent).
    """
    try:
        split = frames.index(DELIMITER)
    except ValueError:
        raise MissingDelimiter(
            f"no {DELIMITER.decode()} delimiter frame among {len(frames)} frames"
        ) from None
    if len(frames) - split - 1 < _FIXED_FRAMES:
        raise MissingDelimiter(
            f"only {len(frames) - split - 1} frames after the delimiter; need signature, "
            "header, parent header, metadata and content"
        )
    signature, header_b, parent_b, metadata, content = frames[split + 1 : split + 6]
    if not signer.verify(signature, header_b, parent_b, metadata, content):
        raise InvalidSignature("message signature does not match its HMAC-SHA256")

    header = _load_object(header_b, "header")
    missing = [name for name in _HEADER_FIELDS if name not in header]
    if missing:
        raise MalformedHeader(f"header lacks required field(s): {', '.join(missing)}")
    _check_ids(header, "header")

    parent: dict[str, Any] | None = None
    if len(parent_b) >= _MIN_PARENT_LEN:
        parent = _load_object(parent_b, "parent header")
        _check_ids(parent, "parent header")

    return KernelMessage(
        identities=tuple(frames[:split]),
        header=header,
        parent_header=parent,
        metadata=bytes(metadata),
        content=bytes(content),
        buffers=tuple(frames[split + 6 :]),
    )


def _header_bytes(
    msg_id: str, msg_type: str, session: str, username: str, date: str, version: str
) -> bytes:
    # Field order as Kallichore writes it (docs/protocol.md §5.3).
    return dumps(
        {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": session,
            "username": username,
            "date": date,
            "version": version,
        }
    )


def build_frames(
    *,
    msg_id: str,
    msg_type: str,
    parent: tuple[str, str] | None,
    metadata: bytes,
    content: bytes,
    buffers: Sequence[bytes],
    session: str,
    username: str,
    version: str,
    date: str,
    signer: Signer,
    identity: bytes | None,
) -> list[bytes]:
    """Frames for one message to a kernel, with headers rebuilt as Kallichore does.

    Only msg_id/msg_type of the client's header and parent survive; session, username,
    version and date are the session's (the parent gets the same ones). ``parent`` is
    ``(msg_id, msg_type)``. ``identity`` is the session id for shell and stdin, ``None`` for
    control. Buffers follow the content frame and are not signed.
    """
    header_b = _header_bytes(msg_id, msg_type, session, username, date, version)
    if parent is None:
        parent_b = b"{}"
    else:
        parent_b = _header_bytes(parent[0], parent[1], session, username, date, version)
    signature = signer.sign(header_b, parent_b, metadata, content)
    frames = [DELIMITER, signature, header_b, parent_b, metadata, content, *buffers]
    if identity is not None:
        frames.insert(0, identity)
    return frames


def format_date(dt: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and ``Z``, e.g. ``2026-03-02T16:06:01.123Z``."""
    if dt.tzinfo is None:
        # A naive datetime is ambiguous (local or UTC?); refuse rather than guess.
        raise ValueError("format_date needs a timezone-aware datetime")
    # isoformat is one C call; strftime goes through CPython's format wrapper and the time
    # module (3.5 % of the daemon's samples in a profile of round trips, when it was used).
    return dt.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class _SecondCache:
    second = -1
    prefix = ""


def format_timestamp(t: float) -> str:
    """`format_date` for a POSIX timestamp (e.g. ``time.time()``), cheaper on the hot path:
    the date and time up to the second are formatted once per second, not once per message."""
    # Rounded to the microsecond first, as datetime.fromtimestamp does: 1772467561.123 is
    # 1772467561.12299990654 as a float and must still read .123.
    micros = round(t * 1_000_000)
    second, micro = divmod(micros, 1_000_000)
    if second != _SecondCache.second:
        _SecondCache.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _SecondCache.second = second
    return f"{_SecondCache.prefix}.{micro // 1000:03d}Z"


def now_date() -> str:
    """The current time as the header ``date`` of a message we send."""
    return format_timestamp(time.time())


def new_msg_id() -> str:
    """10 random lowercase hex chars, the shape of the ids Kallichore generates itself."""
    return secrets.token_hex(5)


_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_compact_ascii = json.JSONEncoder(separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (non-ASCII kept as is)."""
    try:
        return _compact(obj).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (legal in a JSON \\u escape, not in UTF-8): escape everything.
        return _compact_ascii(obj).encode("ascii")
