"""The Jupyter wire protocol over ZeroMQ, as little of it as a client needs.

Signing and light decoding only: header, parent header and content are parsed with ``json``;
dates stay strings (jupyter_client's Session also parses dates, which costs time per message).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from typing import Any

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
_decode = json.JSONDecoder().decode


def loads(data: bytes) -> Any:
    """json.loads of UTF-8 bytes, without json's per-call encoding detection."""
    return _decode(data.decode())


def new_id() -> str:
    return uuid.uuid4().hex


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def header(msg_type: str, session: str, username: str = "bench") -> dict[str, Any]:
    return {
        "msg_id": new_id(),
        "msg_type": msg_type,
        "session": session,
        "username": username,
        "date": now_iso(),
        "version": PROTOCOL_VERSION,
    }


class Signer:
    """HMAC-SHA256 over header, parent, metadata, content (the Jupyter signature)."""

    def __init__(self, key: bytes) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256) if key else None

    def sign(self, parts: list[bytes]) -> bytes:
        if self._base is None:
            return b""
        h = self._base.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode()

    def verify(self, signature: bytes, parts: list[bytes]) -> bool:
        if self._base is None:
            return True
        return hmac.compare_digest(signature, self.sign(parts))


def pack(signer: Signer, hdr: dict[str, Any], content: dict[str, Any]) -> list[bytes]:
    """Frames after the identities: delimiter, signature, header, parent, metadata, content."""
    parts = [json.dumps(hdr).encode(), b"{}", b"{}", json.dumps(content).encode()]
    return [DELIM, signer.sign(parts), *parts]


class BadMessage(Exception):
    pass


def unpack(signer: Signer, frames: list[bytes]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(header, parent_header, content) of a received multipart message; verifies the HMAC."""
    try:
        i = frames.index(DELIM)
    except ValueError:
        raise BadMessage("no <IDS|MSG> delimiter") from None
    sig, hdr, parent, meta, content = frames[i + 1 : i + 6]
    if not signer.verify(sig, [hdr, parent, meta, content]):
        raise BadMessage("bad signature")
    return loads(hdr), loads(parent), loads(content)
