"""The daemon's configuration: everything the command line decides, frozen.

`cli.py` builds a `Config` from kcserver-compatible flags; tests build one directly. Every
wait on the outside world takes its bound from here, so a test can shorten it.
"""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path
from typing import Literal

import attrs

#: The Kallichore (kcserver) release whose API and launch protocol we implement. Positron compares
#: it with the version it pins; 0.1.69 adds execute, history and the MCP parts of /status.
KALLICHORE_VERSION = "0.1.69"

Transport = Literal["tcp", "socket"]
LogLevel = Literal["trace", "debug", "info", "warn", "error"]


def new_token() -> str:
    """A random bearer token: 16 lowercase hex characters, as kcserver generates."""
    return secrets.token_hex(8)


def new_server_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen(kw_only=True)
class Timeouts:
    """Bounds, in seconds, on every wait for a kernel or a client."""

    #: kernel_info_reply during start, when the session gives no connection_timeout.
    default_connection: float = 30.0
    #: Between the kernel_info_request retries that beat the iopub slow-joiner problem.
    kernel_info_retry: float = 0.5
    #: shutdown_request -> process exit, before SIGTERM is sent to the process group.
    shutdown_request: float = 10.0
    #: SIGTERM -> exit, before SIGKILL.
    terminate: float = 5.0
    #: SIGKILL -> exit (reaping); past this the process is reported lost.
    kill: float = 5.0
    #: Heartbeat: wait this long for the echo; beats fall on multiples of the period (timers.py),
    #: so consecutive beats are 0.5 to 1.5 periods apart.
    heartbeat_reply: float = 5.0
    heartbeat_period: float = 2.0
    #: A WebSocket write that takes longer drops the client (its frames stay in the outbox).
    client_write: float = 30.0
    #: WebSocket keep-alive ping period; a client missing more than 3 pongs is dropped.
    client_ping: float = 10.0
    #: What `idle_shutdown_hours: 0` means: shut down this long after everything went idle.
    idle_zero_hours: float = 30.0
    #: How long a client of a per-session socket has to send its whole HTTP upgrade request.
    socket_handshake: float = 10.0
    #: Connecting to the client's --handshake-socket and writing the connection document.
    handshake: float = 10.0
    #: POST /execute: how long a kernel still `starting` is waited for.
    execute_starting: float = 30.0
    #: POST /execute without `timeout_seconds`: the longest it waits before interrupting.
    execute_default: float = 3600.0
    #: POST /execute after its timeout: how long the interrupted request may take to end.
    execute_interrupted: float = 5.0
    #: MCP run_positron_command: how long to wait for a Positron window to attach.
    mcp_window_wait: float = 15.0
    #: MCP run_positron_command: how long the window has to answer.
    mcp_command_reply: float = 45.0


@attrs.frozen(kw_only=True)
class OutboxLimits:
    """Bounds of each session's outbox (frames waiting for, or kept for, a client).

    100,000 frames: a resuming client that falls behind a flooding kernel is told what was
    shed rather than slowing the kernel, so the bound is what it can fall behind by; small
    stream frames cost about 475 bytes each here (docs/durability.md, "Bounds")."""

    max_frames: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


@attrs.frozen(kw_only=True)
class AllocatorTrim:
    """When memory freed after a burst of output is handed back to the OS (memory.py)."""

    #: Seconds between looks at the outboxes; a look that finds under a tenth of
    #: `burst_frames` new frames ends a burst.
    check_every: float = 5.0
    #: Frames produced since the last trim that make a burst worth trimming after.
    burst_frames: int = 5_000


@attrs.frozen(kw_only=True)
class Config:
    transport: Transport = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    #: Bind the API to this Unix socket (transport "socket"); generated when None.
    unix_socket: Path | None = None
    #: Directory for generated sockets (main and per-session); None = XDG runtime dir or tmp.
    socket_dir: Path | None = None
    #: Bearer token; None disables authentication (`--token none`), not the Origin and Host
    #: checks (security.py).
    token: str | None = attrs.field(factory=new_token)
    #: `Origin` values allowed (`--allow-origin`); any other Origin is refused (security.py).
    allowed_origins: frozenset[str] = frozenset()
    connection_file: Path | None = None
    handshake_socket: Path | None = None
    #: None disables idle shutdown; 0 means "about 30 seconds".
    idle_shutdown_hours: int | None = None
    resource_sample_interval_ms: int = 1000
    #: Resource samples cover the kernel's whole process tree (False: its own process only).
    resource_include_children: bool = True
    log_level: LogLevel = "info"
    log_file: Path | None = None
    #: Directory for kernel connection files; None = jupyter runtime dir.
    runtime_dir: Path | None = None
    #: Where session records and kernel output files are kept so that kernels survive a
    #: daemon crash (state.py, docs/durability.md); None keeps nothing (kernel output piped).
    #: kcserver always sets one (--state-dir).
    state_dir: Path | None = None
    server_id: str = attrs.field(factory=new_server_id)
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    outbox: OutboxLimits = attrs.field(factory=OutboxLimits)
    allocator_trim: AllocatorTrim = attrs.field(factory=AllocatorTrim)
    #: Seconds the client writer holds frames that are only stream output, so that a burst of
    #: small outputs goes out in one socket write rather than one write each (a loopback write
    #: costs more CPU than relaying the message). Anything else pending is written at once.
    output_linger: float = 0.002
    #: Seconds the event loop keeps polling after a message was relayed, rather than letting
    #: the CPU go idle before the next one (busypoll.py). Off by default: it trades a core's
    #: worth of CPU while traffic flows (a chatty comm keeps it flowing) for a little latency,
    #: a trade for benchmarks and test harnesses, not for a laptop.
    busy_poll: float = 0.0
