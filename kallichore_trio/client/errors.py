"""The client's errors: one hierarchy under `ClientError`, mapped from HTTP answers.

The daemon answers errors with an `error` object carrying a stable `KS-n` code (or a named code
such as `execution_timeout`), a `startupError` object when a kernel did not come up, and empty
401/404 bodies (docs/protocol.md §3.2). `error_for_response` turns each into the one exception a
caller can catch by meaning, not by code.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class ClientError(Exception):
    """Anything that went wrong talking to the daemon or to a kernel through it."""


class DaemonNotFound(ClientError):
    """No daemon to talk to: no connection file, or nobody listening where it says."""


class AuthError(ClientError):
    """The daemon refused the bearer token (HTTP 401)."""


class ApiError(ClientError):
    """An HTTP error answer: `status`, and the daemon's `code`, `message`, `details`."""

    def __init__(self, message: str, *, status: int, code: str | None = None,
                 details: str | None = None) -> None:
        super().__init__(message if details is None else f"{message} ({details})")
        self.message = message
        self.status = status
        self.code = code
        self.details = details


class SessionNotFound(ApiError):
    """No session by that id (HTTP 404, KS-1)."""


class SessionExists(ApiError):
    """A session by that id exists already (KS-0)."""


class SessionRunning(ApiError):
    """The session's kernel is running and the operation needs it stopped (KS-2)."""


class SessionNotRunning(ApiError):
    """The operation needs a running kernel (KS-3, KS-12)."""


class StartupFailed(ApiError):
    """The kernel did not come up: the daemon's `startupError`, with what the kernel printed
    while starting (`output`) and its `exit_code` when it exited."""

    def __init__(self, message: str, *, status: int, code: str | None = None,
                 details: str | None = None, exit_code: int | None = None,
                 output: str | None = None) -> None:
        super().__init__(message, status=status, code=code, details=details)
        self.exit_code = exit_code
        self.output = output

    def __str__(self) -> str:
        text = super().__str__()
        if self.exit_code is not None:
            text += f"; exit code {self.exit_code}"
        if self.output:
            text += f"\n--- kernel output ---\n{self.output.rstrip()}"
        return text


class ClientTimeout(ClientError, TimeoutError):
    """A wait that ran out; the message names the session and what was awaited."""


class ExecutionTimeout(ClientTimeout):
    """An execution did not finish in time. `partial` is what it produced meanwhile (an
    `ExecutionResult`), when the client collected it."""

    def __init__(self, message: str, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial


class ChannelClosed(ClientError):
    """The session's channel ended: the daemon went away, or another client took the session
    (`evicted`; a session has one client at a time)."""

    def __init__(self, message: str, *, evicted: bool = False) -> None:
        super().__init__(message)
        self.evicted = evicted


class ResumeFailed(ChannelClosed):
    """The channel broke and could not be resumed: every attempt to reconnect failed within
    `Timeouts.reconnect` (`attempts`; `cause`: the last attempt's error)."""

    def __init__(self, message: str, *, attempts: int, cause: BaseException | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.cause = cause


class KernelDied(ClientError):
    """The kernel exited while something was waiting for it."""

    def __init__(self, message: str, *, exit_code: int | None = None,
                 output: str = "") -> None:
        super().__init__(message if not output
                         else f"{message}\n--- kernel output ---\n{output.rstrip()}")
        self.exit_code = exit_code
        self.output = output


class KernelError(ClientError):
    """Code raised an exception in the kernel (`ExecutionResult.raise_for_error`)."""

    def __init__(self, message: str, *, result: Any) -> None:
        super().__init__(message)
        self.result = result


_BY_CODE: dict[str, type[ApiError]] = {
    "KS-0": SessionExists,
    "KS-1": SessionNotFound,
    "KS-2": SessionRunning,
    "KS-3": SessionNotRunning,
    "KS-12": SessionNotRunning,
}


def _body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def error_for_response(response: httpx.Response, *, what: str,
                       session_id: str | None = None) -> ClientError:
    """The exception for a non-2xx answer to `what` (e.g. `start session py`)."""
    status = response.status_code
    if status == 401:
        return AuthError(f"{what}: the daemon refused the token (401); check the connection "
                         "file or --token")
    body = _body(response)
    if status == 404 and session_id is not None:
        return SessionNotFound(f"{what}: no session {session_id!r}", status=404, code="KS-1")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]  # startupError
        exit_code = body.get("exit_code")
        output = body.get("output")
        return StartupFailed(
            f"{what}: {error.get('message', 'the kernel did not start')}", status=status,
            code=error.get("code"), details=error.get("details"),
            exit_code=exit_code if isinstance(exit_code, int) else None,
            output=output if isinstance(output, str) else None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        if code == "execution_timeout":
            return ExecutionTimeout(f"{what}: {body['message']}")
        cls = _BY_CODE.get(code or "", ApiError)
        return cls(f"{what}: {body['message']}", status=status, code=code,
                   details=body.get("details") if isinstance(body.get("details"), str)
                   else None)
    text = response.text.strip() or response.reason_phrase
    return ApiError(f"{what}: HTTP {status}: {text}", status=status)
