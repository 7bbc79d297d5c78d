"""Bringing a kernel up: the JEP 66 handshake, the kernel_info probe, and startup failures.

`Kernel.run` drives these once per incarnation, before anything is relayed:

- `handshake`: a kernel given a registration file reports the ports it bound; we answer and
  build the connection info from them.
- `Probe`: kernel_info_requests of our own until one is answered *and* iopub delivers (the
  slow-joiner problem: a SUB socket misses what is published before it is connected). The
  probe's own traffic is not relayed to the client.
- `StartupOutput` and `startup_failure`: what the kernel printed while starting, and the
  `StartupFailure` that says why it did not come up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from kallichore_trio import wire
from kallichore_trio.errors import (
    ExitedBeforeConnection,
    HandshakeFailed,
    KallichoreError,
    ProcessAbnormalExit,
    SessionConnectionFailed,
    SessionConnectionTimeout,
    StartupFailure,
)
from kallichore_trio.kernel import launch
from kallichore_trio.kernel.connection import connection_info
from kallichore_trio.models import ConnectionInfo

if TYPE_CHECKING:
    from kallichore_trio.kernel.launch import LaunchPlan
    from kallichore_trio.kernel.params import KernelParams
    from kallichore_trio.transport.zmq_trio import TrioSocket

#: Output kept (per start) for the `output` of a startup error.
STARTUP_OUTPUT_LIMIT = 1024 * 1024
_PORT_NAMES = ("control_port", "shell_port", "stdin_port", "hb_port", "iopub_port")


class StartupOutput:
    """What the kernel printed before it was up, bounded by STARTUP_OUTPUT_LIMIT."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._size = 0

    def add(self, text: str) -> None:
        if self._size < STARTUP_OUTPUT_LIMIT:
            self._lines.append(text)
            self._size += len(text)

    @property
    def raw(self) -> str:
        return "".join(self._lines)

    def clean(self) -> str:
        """The output without the startup shell command's marker lines."""
        return launch.clean_startup_output(self.raw)


async def handshake(
    registration: TrioSocket, params: KernelParams, output: StartupOutput
) -> ConnectionInfo:
    """JEP 66: wait for the kernel to report the ports it bound (Kallichore/Ark flavour)."""
    with trio.move_on_after(params.startup_timeout):
        frames = await registration.receive()
        try:
            request = wire.parse_kernel_frames(frames, params.signer)
            if request.msg_type != "handshake_request":
                raise wire.WireError(f"expected handshake_request, got {request.msg_type}")
            content = request.content_json()
            ports = {name: int(content[name]) for name in _PORT_NAMES}
        except (wire.WireError, KeyError, TypeError, ValueError) as exc:
            await registration.send(
                [wire.dumps({"status": "error", "error": str(exc), "capabilities": {}})]
            )
            raise StartupFailure(
                HandshakeFailed(params.session_id, str(exc)), output=output.clean()
            ) from None
        reply = wire.build_frames(
            msg_id=wire.new_msg_id(),
            msg_type="handshake_reply",
            parent=(request.msg_id, request.msg_type),
            metadata=b"null",
            content=wire.dumps({"status": "ok", "capabilities": {}}),
            buffers=(),
            session=params.session_id,
            username=params.username,
            version=params.protocol_version,
            date=wire.now_date(),
            signer=params.signer,
            identity=None,
        )
        await registration.send(reply)
        return connection_info(ports, params.key)
    raise StartupFailure(
        HandshakeFailed(params.session_id, "Timeout waiting for handshake"),
        output=output.clean(),
    )


class Probe:
    """Our own kernel_info exchange during start. `ids` and `iopub_seen` are read on the
    message path (a set test and an Event.set per message), so the kernel keeps them at hand."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.iopub_seen = trio.Event()
        #: A probe sent on shell was answered: the kernel is not running a cell (one that
        #: runs holds its shell). Probes of a re-attached kernel go on control, and one more
        #: on shell (`send`) says when the cell it may be running is over.
        self.shell_answered = trio.Event()
        self.reply: dict[str, Any] | None = None
        self._answered = trio.Event()

    def on_traffic(self, channel: str, msg: wire.KernelMessage) -> None:
        """A message whose parent is one of our probes: not relayed (nor its statuses)."""
        if channel == "iopub":
            self.iopub_seen.set()
        elif msg.msg_type == "kernel_info_reply":
            if channel == "shell":
                self.shell_answered.set()
            if self.reply is None:
                content = msg.content_json()
                self.reply = content if isinstance(content, dict) else {}
                self._answered.set()

    async def run(
        self, send: Callable[[str], Awaitable[Any]], *, timeout: float, retry: float
    ) -> dict[str, Any] | None:
        """Ask (through `send(msg_id)`) until answered and iopub delivers; the reply's content,
        or None after `timeout`."""
        with trio.move_on_after(timeout):
            await self._send(send)
            await self._answered.wait()
            while not self.iopub_seen.is_set():
                with trio.move_on_after(retry):
                    await self.iopub_seen.wait()
                if not self.iopub_seen.is_set():
                    await self._send(send)
            assert self.reply is not None
            return self.reply
        return None

    async def send(self, send: Callable[[str], Awaitable[Any]]) -> None:
        """One more probe, outside `run` (its traffic is kept from the client too)."""
        await self._send(send)

    async def _send(self, send: Callable[[str], Awaitable[Any]]) -> None:
        msg_id = wire.new_msg_id()
        self.ids.add(msg_id)
        await send(msg_id)


def startup_failure(
    *,
    params: KernelParams,
    plan: LaunchPlan | None,
    output: StartupOutput,
    returncode: int | None,
    port_conflict: bool,
    connected: bool,
    exited: bool,
) -> StartupFailure:
    """Why the kernel did not come up: it could not bind its ports, it exited (before or after
    it connected), or it did not answer within the startup timeout."""
    raw = output.raw
    shell = plan.shell if plan is not None else None
    details = launch.startup_context(params.startup_environment,
                                     params.startup_environment_arg, raw, shell, exited=exited)
    error: KallichoreError
    if port_conflict:
        error = SessionConnectionFailed(
            "the kernel could not bind the ports it was given (address already in use)",
            details=details,
        )
        exit_code = None if returncode is None else launch.exit_code_of(returncode)
        return StartupFailure(error, exit_code=exit_code, output=output.clean())
    if exited and returncode is not None:
        if plan is not None and plan.handshake and not connected:
            error = ExitedBeforeConnection(details=details)
        else:
            error = ProcessAbnormalExit(launch.describe_exit(returncode), details=details)
        return StartupFailure(
            error, exit_code=launch.exit_code_of(returncode), output=output.clean()
        )
    error = SessionConnectionTimeout(params.startup_timeout, details=details)
    return StartupFailure(error, exit_code=130, output=output.clean())
