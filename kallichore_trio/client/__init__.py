"""A client for kallichore-trio (and Kallichore) daemons: docs/client.md.

`Client` / `Session` are synchronous (a private Trio loop in a thread holds the connections);
`AsyncClient` / `AsyncSession` are the same on Trio. Both find a daemon from a connection file,
`$KALLICHORE_CONNECTION_FILE`, the default file `kcserver` writes, or a URL and token.
"""

from kallichore_trio.client.aclient import AsyncClient, Timeouts
from kallichore_trio.client.discovery import ServerAddress, find_server
from kallichore_trio.client.errors import (
    ApiError,
    AuthError,
    ChannelClosed,
    ClientError,
    ClientTimeout,
    DaemonNotFound,
    ExecutionTimeout,
    KernelDied,
    KernelError,
    ResumeFailed,
    SessionExists,
    SessionNotFound,
    SessionNotRunning,
    SessionRunning,
    StartupFailed,
)
from kallichore_trio.client.kernelspecs import KernelSpecNotFound, python_kernel_argv
from kallichore_trio.client.messages import (
    ClientDisconnected,
    ExecutionQueued,
    ExitedEvent,
    FramesLost,
    KernelEvent,
    Message,
    OtherEvent,
    OutputEvent,
    ResourceUsageEvent,
    StatusEvent,
    SupervisorRestarted,
    WorkingDirChanged,
)
from kallichore_trio.client.results import ErrorInfo, ExecutionResult, Output
from kallichore_trio.client.session import AsyncSession, Comm, ExecutionStream, InputNotAnswered
from kallichore_trio.client.sync import Client, Session, SyncComm

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncSession",
    "AuthError",
    "ChannelClosed",
    "Client",
    "ClientDisconnected",
    "ClientError",
    "ClientTimeout",
    "Comm",
    "DaemonNotFound",
    "ErrorInfo",
    "ExecutionQueued",
    "ExecutionResult",
    "ExecutionStream",
    "ExecutionTimeout",
    "ExitedEvent",
    "FramesLost",
    "InputNotAnswered",
    "KernelDied",
    "KernelError",
    "KernelEvent",
    "KernelSpecNotFound",
    "Message",
    "OtherEvent",
    "Output",
    "OutputEvent",
    "ResourceUsageEvent",
    "ResumeFailed",
    "ServerAddress",
    "Session",
    "SessionExists",
    "SessionNotFound",
    "SessionNotRunning",
    "SessionRunning",
    "StartupFailed",
    "StatusEvent",
    "SupervisorRestarted",
    "SyncComm",
    "Timeouts",
    "WorkingDirChanged",
    "find_server",
    "python_kernel_argv",
]
