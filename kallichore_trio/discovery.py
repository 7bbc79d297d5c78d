"""How a client finds the server: the server's connection document (docs/protocol.md §1.4).

The document says where we listen and how to authenticate. (Not a kernel's connection file:
those are written by session/connection.py.) Positron gets it either from `--connection-file`
(polled until it parses) or through `--handshake-socket` (the client listens, we connect and
write one JSON document). Both carry the bearer token, so the file is 0600 and written
atomically, and the handshake never touches disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

import trio

from kallichore_trio.config import Config


class BoundAddress(Protocol):
    """What the daemon reports once bound (kallichore_trio.app.ServerAddress)."""

    @property
    def transport(self) -> str: ...
    @property
    def port(self) -> int | None: ...
    @property
    def base_path(self) -> str | None: ...
    @property
    def socket_path(self) -> str | None: ...


class HandshakeError(Exception):
    """The connection document could not be delivered to the client's handshake socket."""


def server_path() -> str:
    """The executable a client would run again: the kcserver script, resolved."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if argv0 and argv0 != "-c":
        candidate = Path(argv0)
        if candidate.exists():
            return str(candidate.resolve())
    return sys.executable


def connection_document(
    config: Config,
    address: BoundAddress,
    *,
    pid: int | None = None,
    executable: str | None = None,
) -> dict[str, Any]:
    """The JSON object Positron reads (`KallichoreServerState`), in Kallichore's field order.

    Fields that do not apply to the transport are omitted, as is `log_path` without --log-file
    (docs/protocol.md §1.4; Kallichore 0.1.64 wrote null there).
    """
    doc: dict[str, Any] = {}
    if address.transport == "tcp":
        doc["port"] = address.port
        doc["base_path"] = address.base_path
    else:
        doc["socket_path"] = address.socket_path
    doc["transport"] = address.transport
    doc["server_path"] = executable if executable is not None else server_path()
    doc["server_pid"] = pid if pid is not None else os.getpid()
    doc["bearer_token"] = config.token
    if config.log_file is not None:
        doc["log_path"] = str(config.log_file)
    doc["server_id"] = config.server_id
    return doc


def write_connection_file(path: Path, doc: dict[str, Any]) -> None:
    """Write doc to path atomically, mode 0600: a poller never sees a half-written file."""
    path = Path(path)
    text = json.dumps(doc, indent=2) + "\n"
    # mkstemp creates the file 0600 in the target directory, so os.replace is a same-filesystem
    # rename and the token is never readable by others, not even briefly.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; best effort (some filesystems refuse O_RDONLY on directories).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


async def send_handshake(path: Path, doc: dict[str, Any], timeout: float) -> None:
    """Connect to the client's Unix socket, write doc as one JSON line, half-close
    (docs/protocol.md §1.4).

    Raises HandshakeError when nobody listens there or it takes longer than timeout.
    """
    payload = (json.dumps(doc) + "\n").encode("utf-8")
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(os.fspath(path))
            async with stream:
                await stream.send_all(payload)
                # The client reads to EOF: the half-close is what tells it the document is whole.
                await stream.send_eof()
    except trio.TooSlowError as exc:
        raise HandshakeError(
            f"timed out after {timeout:g} s delivering the connection details to {path}"
        ) from exc
    except (OSError, trio.BrokenResourceError) as exc:
        raise HandshakeError(f"could not connect to the handshake socket {path}: {exc}") from exc
