"""One kernel incarnation: a kernel process (none for adopted kernels) and its ZeroMQ sockets.

A `Kernel` lives from start (or adopt) to the process's exit; a restart makes a new one. Its
`run()` task owns everything the incarnation needs, in one nursery:

    run
     ├─ stdout / stderr readers   process output lines -> session.on_output
     ├─ process watch             exit code -> session.on_kernel_exit, then ends the incarnation
     ├─ one pump per socket       shell, control, stdin, iopub -> session.on_kernel_message
     └─ heartbeat                 REQ echo every 2 s -> session.on_heartbeat

`run()` reports the kernel_info_reply content through `task_status.started()`, or raises
`StartupFailure` when the kernel does not come up. When `run()` returns, the process and every
process left in its group are gone, and its ports are released.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio
import zmq

from kallichore_trio import wire
from kallichore_trio.errors import (
    ExitedBeforeConnection,
    HandshakeFailed,
    KallichoreError,
    ProcessAbnormalExit,
    ProcessStartFailed,
    SessionConnectionFailed,
    SessionConnectionTimeout,
    StartupFailure,
)
from kallichore_trio.kernel import launch
from kallichore_trio.kernel.connection import (
    PortReservation,
    connection_info,
    write_registration_file,
)
from kallichore_trio.models import ConnectionInfo
from kallichore_trio.timers import next_multiple
from kallichore_trio.zmq_trio import (
    Subscription,
    TrioSocket,
    open_socket,
    open_subscription,
    round_trip,
)

if TYPE_CHECKING:
    from kallichore_trio.session.session import KernelSession

log = logging.getLogger(__name__)

#: Output kept (per start) for the `output` of a startup error.
STARTUP_OUTPUT_LIMIT = 1024 * 1024
#: A line longer than this without a newline is passed on in pieces.
MAX_LINE = 64 * 1024
HEARTBEAT_PAYLOAD = b"kallichore-heartbeat"
#: strerror(EADDRINUSE) as kernels print it when a port we gave them was taken meanwhile.
ADDRESS_IN_USE = "Address already in use"
IOPUB_RCVHWM = 20_000
#: The zmq adapter's safety wake-up; an idle daemon with many sessions pays for each tick.
SOCKET_TICK = 5.0


def zmq_identity(session_id: str) -> bytes:
    """The DEALER identity: the session id, unless ZeroMQ cannot take it (too long, NUL-led)."""
    raw = session_id.encode()
    if 0 < len(raw) <= 255 and not raw.startswith(b"\0"):
        return raw
    return b"kc-" + hashlib.sha256(raw).hexdigest()[:32].encode()


@attrs.define
class LaunchPlan:
    """What to spawn; None for an adopted kernel."""

    command: list[str]
    env: dict[str, str]
    cwd: str
    shell: str | None
    #: The file named in argv: a connection file, or for JEP 66 a registration file that the
    #: kernel writes nothing to and we write once the registration socket is bound.
    connection_file: Path
    handshake: bool = False


class Kernel:
    def __init__(
        self,
        session: KernelSession,
        *,
        info: ConnectionInfo | None,
        plan: LaunchPlan | None,
        ports: PortReservation | None,
        startup_timeout: float,
        retry_on_port_conflict: bool = False,
    ) -> None:
        self.session = session
        self.info = info
        self.plan = plan
        self.ports = ports
        self.startup_timeout = startup_timeout
        self.process: trio.Process | None = None
        self.returncode: int | None = None
        self.exited = trio.Event()
        #: Set once the incarnation is over: process reaped, sockets closed, ports and files
        #: released (the next incarnation reuses the connection file's path).
        self.finished = trio.Event()
        self.started = False
        #: The kernel could not bind a port we picked for it: another process took the port
        #: between our check and the kernel's bind (the port race; see connection.py).
        self.port_conflict = False
        #: Set by the session when it will start a fresh incarnation on fresh ports after a
        #: port conflict, so that this one's exit is not reported to clients.
        self.retry_on_port_conflict = retry_on_port_conflict
        self._address_in_use_printed = False
        self._signer = session.signer
        self._identity = zmq_identity(session.session_id)
        self._sockets: dict[str, TrioSocket] = {}
        self._scope = trio.CancelScope()
        self._output: list[str] = []
        self._output_size = 0
        self._readers_done = trio.Event()
        self._open_readers = 0
        # Startup probe state.
        self._probe_ids: set[str] = set()
        self._probe_reply: dict[str, Any] | None = None
        self._probe_event = trio.Event()
        self._iopub_seen = trio.Event()

    def __repr__(self) -> str:
        state = "exited" if self.exited.is_set() else ("running" if self.started else "starting")
        return f"<Kernel session={self.session.session_id!r} pid={self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        if self.process is None or self.returncode is not None:
            return None
        return self.process.pid

    # ---- the incarnation task ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
        failure: StartupFailure | None = None
        try:
            with self._scope:
                async with AsyncExitStack() as stack:
                    nursery = await stack.enter_async_context(trio.open_nursery())
                    try:
                        registration = None
                        if self.plan is not None and self.plan.handshake:
                            registration = await stack.enter_async_context(self._registration())
                            write_registration_file(
                                self.plan.connection_file,
                                self.session.key,
                                int(registration.last_endpoint.rsplit(":", 1)[1]),
                            )
                        if self.plan is not None:
                            await self._spawn(nursery)
                        if registration is not None:
                            # The socket stays open until the incarnation ends: closing it
                            # now could discard the reply before libzmq has sent it.
                            self.info = await self._handshake(registration)
                        for channel in ("shell", "control", "stdin"):
                            sock = await stack.enter_async_context(self._open(channel))
                            self._sockets[channel] = sock
                            nursery.start_soon(self._pump, channel, sock, name=f"pump {channel}")
                        iopub = await stack.enter_async_context(self._open_iopub())
                        nursery.start_soon(self._pump_iopub, iopub, name="pump iopub")
                        reply = await self._probe()
                    except StartupFailure as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()
                    except zmq.ZMQError as exc:
                        failure = StartupFailure(
                            SessionConnectionFailed(str(exc)), output=self.startup_output()
                        )
                        nursery.cancel_scope.cancel()
                    else:
                        self.started = True
                        nursery.start_soon(self._heartbeat, name="heartbeat")
                        task_status.started(reply)
                        await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._reap()
                finally:
                    self.finished.set()
        if failure is not None:
            raise failure
        if not self.started:
            raise self._startup_failure(exited=True)

    def _registration(self) -> Any:
        return open_socket(
            self.session.zmq_context, zmq.REP, bind="tcp://127.0.0.1:0", name="registration"
        )

    async def _spawn(self, nursery: trio.Nursery) -> None:
        assert self.plan is not None
        try:
            self.process = await launch.spawn(self.plan.command, self.plan.env, self.plan.cwd)
        except OSError as exc:
            self.session.on_spawn_failed(f"failed to spawn process: {exc}")
            raise StartupFailure(ProcessStartFailed(str(exc)), exit_code=exc.errno) from None
        log.info(
            "session %s: started kernel pid %d: %s",
            self.session.session_id,
            self.process.pid,
            launch.describe_command(self.plan.command),
        )
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            assert stream is not None
            self._open_readers += 1
            nursery.start_soon(self._read_output, name, stream, name=f"read {name}")
        nursery.start_soon(self._watch_process, name="process watch")

    def _url(self, channel: str) -> str:
        assert self.info is not None
        return f"{self.info.transport}://{self.info.ip}:{getattr(self.info, channel + '_port')}"

    def _open(self, channel: str) -> Any:
        return open_socket(
            self.session.zmq_context, zmq.DEALER, connect=self._url(channel),
            identity=self._identity, name=channel, sndhwm=0, tick=SOCKET_TICK,
        )

    def _open_iopub(self) -> Any:
        # Our own accounting bounds the backlog (the outbox); libzmq must not drop silently.
        # libzmq may hold up to IOPUB_RCVHWM messages while a slow client holds the pump back;
        # past that the kernel's PUB applies its own high-water mark.
        return open_subscription(self.session.zmq_context, self._url("iopub"),
                                 rcvhwm=IOPUB_RCVHWM, name="iopub", tick=SOCKET_TICK)

    # ---- startup -----------------------------------------------------------------------

    async def _handshake(self, registration: TrioSocket) -> ConnectionInfo:
        """JEP 66: wait for the kernel to report the ports it bound (Kallichore/Ark flavour)."""
        with trio.move_on_after(self.startup_timeout):
            frames = await registration.receive()
            try:
                request = wire.parse_kernel_frames(frames, self._signer)
                if request.msg_type != "handshake_request":
                    raise wire.WireError(f"expected handshake_request, got {request.msg_type}")
                content = request.content_json()
                ports = {
                    name: int(content[name])
                    for name in ("control_port", "shell_port", "stdin_port", "hb_port",
                                 "iopub_port")
                }
            except (wire.WireError, KeyError, TypeError, ValueError) as exc:
                await registration.send(
                    [wire.dumps({"status": "error", "error": str(exc), "capabilities": {}})]
                )
                raise StartupFailure(
                    HandshakeFailed(self.session.session_id, str(exc)),
                    output=self.startup_output(),
                ) from None
            reply = wire.build_frames(
                msg_id=wire.new_msg_id(),
                msg_type="handshake_reply",
                parent=(request.msg_id, request.msg_type),
                metadata=b"null",
                content=wire.dumps({"status": "ok", "capabilities": {}}),
                buffers=(),
                session=self.session.session_id,
                username=self.session.model.username,
                version=self.session.protocol_version,
                date=wire.now_date(),
                signer=self._signer,
                identity=None,
            )
            await registration.send(reply)
            info = connection_info(ports, self.session.key)
            self.session.on_handshake(info)
            return info
        raise StartupFailure(
            HandshakeFailed(self.session.session_id, "Timeout waiting for handshake"),
            output=self.startup_output(),
        )

    async def _probe(self) -> dict[str, Any]:
        """Ask for kernel_info until it is answered *and* iopub delivers (the slow joiner)."""
        retry = self.session.config.timeouts.kernel_info_retry
        with trio.move_on_after(self.startup_timeout):
            await self._send_probe()
            await self._probe_event.wait()
            while not self._iopub_seen.is_set():
                with trio.move_on_after(retry):
                    await self._iopub_seen.wait()
                if not self._iopub_seen.is_set():
                    await self._send_probe()
            assert self._probe_reply is not None
            return self._probe_reply
        raise self._startup_failure(exited=False)

    async def _send_probe(self) -> None:
        msg_id = wire.new_msg_id()
        self._probe_ids.add(msg_id)
        await self.send_request("shell", "kernel_info_request", {}, msg_id=msg_id)

    def startup_output(self) -> str:
        return launch.clean_startup_output("".join(self._output))

    def _startup_failure(self, *, exited: bool) -> StartupFailure:
        raw = "".join(self._output)
        shell = self.plan.shell if self.plan is not None else None
        details = launch.startup_context(self.session.model, raw, shell, exited=exited)
        error: KallichoreError
        if self.port_conflict:
            error = SessionConnectionFailed(
                "the kernel could not bind the ports it was given (address already in use)",
                details=details,
            )
            exit_code = None if self.returncode is None else launch.exit_code_of(self.returncode)
            return StartupFailure(error, exit_code=exit_code, output=self.startup_output())
        if exited and self.returncode is not None:
            if self.plan is not None and self.plan.handshake and self.info is None:
                error = ExitedBeforeConnection(details=details)
            else:
                error = ProcessAbnormalExit(launch.describe_exit(self.returncode), details=details)
            return StartupFailure(
                error, exit_code=launch.exit_code_of(self.returncode), output=self.startup_output()
            )
        error = SessionConnectionTimeout(self.startup_timeout, details=details)
        return StartupFailure(error, exit_code=130, output=self.startup_output())

    # ---- tasks ---------------------------------------------------------------------------

    async def _read_output(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        try:
            while chunk := await stream.receive_some(65536):
                pending += chunk
                while (cut := pending.find(b"\n")) >= 0 or len(pending) > MAX_LINE:
                    end = cut + 1 if cut >= 0 else MAX_LINE
                    self._on_line(name, pending[:end])
                    pending = pending[end:]
            if pending:
                self._on_line(name, pending)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._open_readers -= 1
            if self._open_readers == 0:
                self._readers_done.set()

    def _on_line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        if not self.started:
            if self._output_size < STARTUP_OUTPUT_LIMIT:
                self._output.append(text)
                self._output_size += len(text)
            if self.ports is not None and ADDRESS_IN_USE in text:
                self._on_address_in_use(text, self.ports)
        self.session.on_output(stream, text)

    def _on_address_in_use(self, text: str, ports: PortReservation) -> None:
        """A kernel that failed to bind one of our ports will never answer: give up on it now.

        ipykernel prints the ZMQError (naming the address) and then hangs, kept alive by its
        threads; other kernels print and exit. A line naming one of our ports ends the
        incarnation at once; the bare message counts if the process then exits.
        """
        self._address_in_use_printed = True
        if any(f":{port}" in text for port in ports.ports.values()):
            self.port_conflict = True
            log.warning("session %s: the kernel could not bind a port it was given: %s",
                        self.session.session_id, text.strip()[-200:])
            self._scope.cancel()

    async def _watch_process(self) -> None:
        assert self.process is not None
        self.returncode = await self.process.wait()
        # Let the last lines the kernel printed arrive before its exit is reported.
        with trio.move_on_after(1.0):
            await self._readers_done.wait()
        if not self.started and self._address_in_use_printed:
            self.port_conflict = True
        log.info(
            "session %s: kernel pid %d exited (%s)",
            self.session.session_id,
            self.process.pid,
            launch.describe_exit(self.returncode),
        )
        self.exited.set()
        self.session.on_kernel_exit(self, launch.exit_code_of(self.returncode))
        self._scope.cancel()

    async def _pump(self, channel: str, sock: TrioSocket) -> None:
        async for frames in sock:
            # Take everything already received in one go: one checkpoint per batch, not per
            # message, on the hot path.
            batch = [frames]
            while len(batch) < 256:
                try:
                    batch.append(sock.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self._relay(channel, batch)

    async def _pump_iopub(self, iopub: Subscription) -> None:
        session = self.session
        while True:
            try:
                batch = await iopub.receive_batch()
            except trio.ClosedResourceError:
                return  # the incarnation is ending
            await self._relay("iopub", batch)
            # A client that reads slower than the kernel writes holds the pump back (and so
            # the kernel, through ZeroMQ) instead of losing output.
            await session.wait_for_room()

    async def _relay(self, channel: str, batch: list[list[bytes]]) -> None:
        self.session.on_traffic()
        for frames in batch:
            due = self._on_frames(channel, frames)
            if due is not None:
                await self.send(due)

    def _on_frames(self, channel: str, frames: list[bytes]) -> wire.ClientMessage | None:
        try:
            msg = wire.parse_kernel_frames(frames, self._signer)
        except wire.WireError as exc:
            log.warning("session %s: dropped a %s message: %s",
                        self.session.session_id, channel, exc)
            return None
        if self._probe_ids and msg.parent_msg_id in self._probe_ids:
            self._on_probe_traffic(channel, msg)
            return None
        if channel == "iopub":
            self._iopub_seen.set()
        elif channel == "stdin":
            # Rare (a prompt for input), and a cell waiting on a prompt nobody saw is hard to
            # diagnose: this tells "never reached us" from "lost after us".
            log.debug("session %s: stdin %s (parent %s) via %r", self.session.session_id,
                      msg.msg_type, msg.parent_msg_id, msg.identities)
        return self.session.on_kernel_message(msg, channel)

    def _on_probe_traffic(self, channel: str, msg: wire.KernelMessage) -> None:
        """Our own kernel_info exchange is not relayed (nor are its busy/idle statuses)."""
        if channel == "iopub":
            self._iopub_seen.set()
        elif msg.msg_type == "kernel_info_reply" and self._probe_reply is None:
            content = msg.content_json()
            self._probe_reply = content if isinstance(content, dict) else {}
            self._probe_event.set()

    async def _heartbeat(self) -> None:
        assert self.info is not None
        timeouts = self.session.config.timeouts
        url = f"{self.info.transport}://{self.info.ip}:{self.info.hb_port}"
        while True:
            # A REQ socket that missed its reply cannot send again: use a fresh one each time.
            hb = self.session.zmq_context.socket(zmq.REQ)
            try:
                hb.linger = 0
                hb.connect(url)
                alive = True
                while alive:
                    alive = await round_trip(hb, [HEARTBEAT_PAYLOAD], timeouts.heartbeat_reply)
                    self.session.on_heartbeat(alive)
                    if alive:
                        await trio.sleep_until(next_multiple(timeouts.heartbeat_period))
            finally:
                trio.lowlevel.notify_closing(hb.getsockopt(zmq.FD))
                hb.close()

    # ---- commands ----------------------------------------------------------------------

    async def send(self, msg: wire.ClientMessage) -> None:
        """Sign and send a client's message to the kernel."""
        await self._send_frames(
            msg.channel,
            msg_id=msg.msg_id,
            msg_type=msg.msg_type,
            parent=msg.parent,
            metadata=wire.dumps(msg.metadata),
            content=wire.dumps(msg.content),
            buffers=msg.buffers,
        )

    async def send_request(
        self, channel: str, msg_type: str, content: dict[str, Any], *, msg_id: str | None = None
    ) -> str:
        """Send a request of our own (kernel_info, interrupt, shutdown); return its msg_id."""
        msg_id = msg_id or wire.new_msg_id()
        await self._send_frames(
            channel,
            msg_id=msg_id,
            msg_type=msg_type,
            parent=None,
            metadata=b"{}",
            content=wire.dumps(content),
            buffers=(),
        )
        return msg_id

    async def _send_frames(self, channel: str, **fields: Any) -> None:
        sock = self._sockets.get(channel)
        if sock is None:
            raise trio.ClosedResourceError(f"no {channel} socket")
        frames = wire.build_frames(
            session=self.session.session_id,
            username=self.session.model.username,
            version=self.session.protocol_version,
            date=wire.now_date(),
            signer=self._signer,
            identity=self._identity if channel in ("shell", "stdin") else None,
            **fields,
        )
        await sock.send(frames)

    @property
    def connected(self) -> bool:
        return self.started and not self.exited.is_set()

    @property
    def retrying(self) -> bool:
        """This incarnation failed on a port conflict and the session starts another."""
        return self.port_conflict and self.retry_on_port_conflict

    def signal(self, sig: signal.Signals) -> bool:
        pid = self.pid
        return pid is not None and launch.signal_group(pid, sig)

    async def stop(self, *, restart: bool, grace: float) -> None:
        """Ask the kernel to shut down, then insist: SIGTERM, then SIGKILL, each bounded."""
        timeouts = self.session.config.timeouts
        if self.connected:
            try:
                await self.session.send_own_request(
                    self, "control", "shutdown_request", {"restart": restart}
                )
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        if self.process is None:
            # An adopted kernel: we cannot make it exit; give it a moment, then let go.
            with trio.move_on_after(min(grace, 1.0)):
                await self.exited.wait()
            self._scope.cancel()
            return
        with trio.move_on_after(grace):
            await self.exited.wait()
            return
        for sig, wait in ((signal.SIGTERM, timeouts.terminate), (signal.SIGKILL, timeouts.kill)):
            if self.exited.is_set():
                return
            log.warning("session %s: kernel did not exit; sending %s",
                        self.session.session_id, sig.name)
            self.signal(sig)
            with trio.move_on_after(wait):
                await self.exited.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def _reap(self) -> None:
        """Leave nothing behind: the process, its group, its ports, its files."""
        if self.process is not None:
            pid = self.process.pid
            # Process.returncode polls, and so may reap the process right here: keep what it
            # says, or the exit would go unreported and the session keep a stale pid.
            returncode = self.process.returncode
            if returncode is None:
                launch.signal_group(pid, signal.SIGKILL)
                with trio.move_on_after(self.session.config.timeouts.kill):
                    self.returncode = await self.process.wait()
            elif self.returncode is None:
                self.returncode = returncode
            # Children the kernel started may outlive it in its group; end them too.
            launch.signal_group(pid, signal.SIGKILL)
            if not self.exited.is_set() and self.returncode is not None:
                self.exited.set()
                self.session.on_kernel_exit(self, launch.exit_code_of(self.returncode))
        elif not self.exited.is_set():
            self.exited.set()
            self.session.on_kernel_exit(self, 0)
        if self.ports is not None:
            self.ports.release()
        if self.plan is not None:
            try:
                os.unlink(self.plan.connection_file)
            except OSError:
                pass
