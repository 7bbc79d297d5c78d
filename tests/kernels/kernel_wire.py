"""Signing and building Jupyter messages for the test kernels (run as scripts from this folder).

Deliberately independent of kallichore_trio.wire: a test kernel that shared the daemon's codec
would share its bugs, and the tests would not see them.
"""

import datetime
import hashlib
import hmac
import json
import uuid

DELIMITER = b"<IDS|MSG>"


class KernelWire:
    """A kernel's side of the wire: HMAC-SHA256 signatures and outgoing messages."""

    def __init__(self, key: bytes, *, session: str, version: str = "5.3") -> None:
        self.key = key
        self.session = session
        self.version = version

    def sign(self, parts: list[bytes]) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def message(self, msg_type: str, content: dict, parent: dict | None = None) -> list[bytes]:
        """The frames of a message (without routing identities): delimiter, signature, parts."""
        header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": self.session,
                  "username": "kernel", "version": self.version,
                  "date": datetime.datetime.now(datetime.UTC).isoformat()}
        parts = [json.dumps(p).encode() for p in (header, parent or {}, {}, content)]
        return [DELIMITER, self.sign(parts), *parts]
