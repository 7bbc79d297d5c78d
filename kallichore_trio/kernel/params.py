"""`KernelParams`: what every incarnation of a session's kernel shares, frozen.

Its own module so that kernel.py and startup.py can both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import zmq

from kallichore_trio import wire
from kallichore_trio.config import Timeouts


@attrs.frozen
class KernelParams:
    """Who the kernel talks to and how long it waits: the same for every incarnation of a
    session."""

    session_id: str
    username: str
    protocol_version: str
    #: The HMAC key, and its signer (one per session, shared by its incarnations).
    key: str
    signer: wire.Signer
    zmq_context: zmq.Context[Any]
    timeouts: Timeouts
    #: For kernel_info_reply (or the JEP 66 handshake) after the spawn.
    startup_timeout: float
    #: The session's startup_environment and its argument, for startup errors' details.
    startup_environment: str = "none"
    startup_environment_arg: str | None = None
    #: Files the kernel's stdout and stderr go to, which the daemon follows; None: pipes. A
    #: file, unlike a pipe, outlives the daemon: a kernel writing to it is not hurt by a
    #: daemon crash, and the next daemon can follow it (docs/durability.md).
    output_files: tuple[Path, Path] | None = None


__all__ = ["KernelParams"]
