"""Kernel-side connection details: ports, the HMAC key, connection and registration files.

Ports are picked by binding port 0 and releasing it, which races with anything else binding
ports on the machine. Two kernels *we* start at once never get the same port: every port handed
out stays reserved, process-wide, until the kernel that got it is gone. Other programs can still
take a port in the meantime (ipykernel itself binds a random port for its output pipe while it
starts): the kernel then fails to bind, and the session starts it again on fresh ports (see
`Kernel.port_conflict`). JEP 66 kernels bind their own ports and avoid the race entirely.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from pathlib import Path

from jupyter_client.connect import write_connection_file

from kallichore_trio.models import ConnectionInfo

_reserved: set[int] = set()

PORT_NAMES = ("control_port", "shell_port", "iopub_port", "hb_port", "stdin_port")


class PortReservation:
    """Five ports held for one kernel; `release()` gives them back."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports

    def release(self) -> None:
        for port in self.ports.values():
            _reserved.discard(port)
        self.ports = {}

    def __repr__(self) -> str:
        return f"<PortReservation {self.ports}>"


def _free_port(ip: str) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        if port not in _reserved:
            _reserved.add(port)
            return port
    raise OSError("could not find a free port that is not already reserved")


def reserve_ports(ip: str = "127.0.0.1") -> PortReservation:
    ports: dict[str, int] = {}
    try:
        for name in PORT_NAMES:
            ports[name] = _free_port(ip)
    except OSError:
        PortReservation(ports).release()
        raise
    return PortReservation(ports)


def new_key() -> str:
    """A per-session HMAC key: 16 random bytes as 32 lowercase hex characters."""
    return secrets.token_hex(16)


def connection_info(ports: dict[str, int], key: str, ip: str = "127.0.0.1") -> ConnectionInfo:
    return ConnectionInfo(
        control_port=ports["control_port"],
        shell_port=ports["shell_port"],
        stdin_port=ports["stdin_port"],
        hb_port=ports["hb_port"],
        iopub_port=ports["iopub_port"],
        signature_scheme="hmac-sha256",
        key=key,
        transport="tcp",
        ip=ip,
    )


def safe_file_stem(session_id: str) -> str:
    """Session ids are arbitrary strings; file names must not be."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", session_id)[:80]
    return stem or "session"


def write_kernel_connection_file(directory: Path, session_id: str, info: ConnectionInfo) -> Path:
    """Write the kernel's connection file (mode 0600, via jupyter_client) and return its path."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"connection_{safe_file_stem(session_id)}.json"
    write_connection_file(
        str(path),
        ip=info.ip,
        key=info.key.encode(),
        transport=info.transport,
        signature_scheme=info.signature_scheme,
        shell_port=info.shell_port,
        iopub_port=info.iopub_port,
        stdin_port=info.stdin_port,
        hb_port=info.hb_port,
        control_port=info.control_port,
    )
    return path


def registration_file_path(directory: Path, session_id: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory / f"registration_{safe_file_stem(session_id)}.json"


def write_registration_file(path: Path, key: str, registration_port: int) -> None:
    """The JEP 66 registration file, Kallichore flavour (no kernel_id), mode 0600."""
    doc = {
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "ip": "127.0.0.1",
        "key": key,
        "registration_port": registration_port,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)


def uses_handshake(protocol_version: str | None) -> bool:
    """JEP 66 for protocol 5.5 and later; anything unparseable means the classic way."""
    try:
        major, minor = (int(p) for p in (protocol_version or "5.3").split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 5)
