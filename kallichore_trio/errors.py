"""The errors clients see, with Kallichore's stable `KS-n` codes.

Each `KallichoreError` subclass fixes its code and its HTTP status; the HTTP layer turns any of
them into the `error` object (docs/protocol.md §3.2), so handlers raise and never build error
bodies themselves. `StartupFailure` is the one error with a different body (`startupError`,
HTTP 500).

A code has a class here only once something raises it: the full table of the reference's codes
is docs/protocol.md §3.2, and classes nothing raises would be untested text that drifts. The
reference's KS-4 (process not found), KS-9 (session creation failed) and KS-18 (no connection
info) have no class for that reason; KS-16 (start failed) is the base class's default code.
"""

from __future__ import annotations

from typing import ClassVar


class KallichoreError(Exception):
    """An error with a Kallichore code, a human message and optional details."""

    code: ClassVar[str] = "KS-16"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.code} {self.message!r}>"


class SessionExists(KallichoreError):
    code, http_status = "KS-0", 400

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} already exists")


class SessionNotFound(KallichoreError):
    code, http_status = "KS-1", 404

    def __init__(self, session_id: str, *, details: str | None = None) -> None:
        super().__init__(f"Session {session_id} not found", details=details)


class SessionRunning(KallichoreError):
    code, http_status = "KS-2", 400

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} is running")


class SessionNotRunning(KallichoreError):
    code, http_status = "KS-3", 400

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} is not running")


class ProcessStartFailed(KallichoreError):
    code, http_status = "KS-5", 500

    def __init__(self, reason: str, *, details: str | None = None) -> None:
        super().__init__(f"Failed to start process for session: {reason}", details=details)


class SessionConnectionFailed(KallichoreError):
    code, http_status = "KS-6", 500

    def __init__(self, reason: str, *, details: str | None = None) -> None:
        super().__init__(
            f"Failed to connect to session's ZeroMQ sockets: {reason}", details=details
        )


class SessionConnectionTimeout(KallichoreError):
    code, http_status = "KS-7", 500

    def __init__(self, seconds: float, *, details: str | None = None) -> None:
        super().__init__(
            "Timed out waiting to connect to session's ZeroMQ sockets after "
            f"{seconds:g} seconds",
            details=details,
        )


class ProcessAbnormalExit(KallichoreError):
    code, http_status = "KS-8", 500

    def __init__(self, exit_status: str, *, details: str | None = None) -> None:
        super().__init__(f"The process exited abnormally ({exit_status})", details=details)


class SessionInterruptFailed(KallichoreError):
    code, http_status = "KS-10", 400

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(f"Failed to interrupt session {session_id}: {reason}")


class NoProcess(KallichoreError):
    code, http_status = "KS-12", 400

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"There is no process associated with session {session_id} (has it exited?)"
        )


class RestartFailed(KallichoreError):
    code, http_status = "KS-13", 500

    def __init__(self, reason: str, *, details: str | None = None) -> None:
        super().__init__(f"Failed to restart kernel: {reason}", details=details)


class ExitedBeforeConnection(KallichoreError):
    code, http_status = "KS-14", 500

    def __init__(self, *, details: str | None = None) -> None:
        super().__init__(
            "The kernel exited before a connection could be established", details=details
        )


class HandshakeFailed(KallichoreError):
    code, http_status = "KS-17", 500

    def __init__(self, session_id: str, reason: str, *, details: str | None = None) -> None:
        super().__init__(f"JEP 66 handshake failed for session {session_id}: {reason}",
                         details=details)


class KernelPathNotFound(KallichoreError):
    code, http_status = "KS-19", 400

    def __init__(self, path: str) -> None:
        super().__init__(f"Kernel path not found: {path}")


class StartupFailure(Exception):
    """A kernel that did not come up: HTTP 500 with a `startupError` body.

    Carries what the user needs to understand why: the error, the exit code when the process
    ended, and what the kernel printed while starting.
    """

    def __init__(
        self, error: KallichoreError, *, exit_code: int | None = None, output: str | None = None
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.exit_code = exit_code
        self.output = output

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {}
        if self.exit_code is not None:
            body["exit_code"] = self.exit_code
        if self.output is not None:
            body["output"] = self.output
        body["error"] = self.error.to_dict()
        return body

    def __repr__(self) -> str:
        return f"<StartupFailure {self.error!r} exit_code={self.exit_code}>"


class ConfigurationError(KallichoreError):
    """A server configuration value out of range (the reference's ad-hoc code "400")."""

    code, http_status = "400", 400


class SocketPathError(KallichoreError):
    """A per-session socket that cannot be created (`socket_path_too_long`, ...)."""

    http_status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]


class ExecuteFailed(KallichoreError):
    """`POST /sessions/{id}/execute` could not run the code: 400 with a named code
    (`session_not_ready`, `send_failed`, `channel_closed`)."""

    http_status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]


class ExecuteTimeout(KallichoreError):
    """The execution outlived its timeout; the kernel was interrupted (HTTP 408)."""

    code, http_status = "execution_timeout", 408

    def __init__(self, seconds: float) -> None:
        super().__init__(f"The execution did not finish within {seconds:g} seconds; "
                         "the kernel was interrupted")
