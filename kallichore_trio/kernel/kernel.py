"""One kernel incarnation: a kernel process (none for adopted kernels) and its ZeroMQ sockets.

A `Kernel` lives from start (or adopt) to the process's exit; a restart makes a new one. It is
built from a frozen `KernelParams` and reports through a `KernelEvents` (the session implements
it; a test can pass a recorder): it imports nothing from the session layer. Its `run()` task
owns everything the incarnation needs, in one nursery:

    run
     ├─ stdout / stderr readers   process output lines -> events.on_output
     ├─ process watch             exit code -> events.on_kernel_exit, then ends the incarnation
     ├─ one pump per socket       shell, control, stdin, iopub -> events.on_kernel_message
     └─ heartbeat                 REQ echo every 2 s -> events.on_heartbeat

`run()` reports the kernel_info_reply content through `task_status.started()`, or raises
`StartupFailure` when the kernel does not come up (startup.py). When `run()` returns, the
process and every process left in its group are gone, and its ports are released.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import trio
import zmq

from kallichore_trio import wire
from kallichore_trio.errors import ProcessStartFailed, SessionConnectionFailed, StartupFailure
from kallichore_trio.kernel import launch, output
from kallichore_trio.kernel.connection import PortReservation, write_registration_file
from kallichore_trio.kernel.launch import LaunchPlan
from kallichore_trio.kernel.params import KernelParams
from kallichore_trio.kernel.startup import Probe, StartupOutput, handshake, startup_failure
from kallichore_trio.models import ConnectionInfo
from kallichore_trio.state import ProcessRef
from kallichore_trio.timers import next_multiple
from kallichore_trio.transport.zmq_trio import (
    Subscription,
    TrioSocket,
    open_socket,
    open_subscription,
    round_trip,
)

log = logging.getLogger(__name__)

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


class KernelEvents(Protocol):
    """What a `Kernel` reports, and the one thing it waits for. The session implements it.

    `on_kernel_message` and `on_traffic` are on the message path: they run for every message
    (every batch) and must not block. A request `on_kernel_message` returns (the execution
    queue's next one, now due) is sent to the kernel by the pump that delivered the message.
    """

    def on_kernel_message(
        self, msg: wire.KernelMessage, channel: str
    ) -> wire.ClientMessage | None: ...

    def on_traffic(self) -> None:
        """A batch of kernel messages arrived (busypoll.py)."""

    async def wait_for_room(self) -> None:
        """Backpressure on iopub: return once the client can take more."""

    def on_output(self, stream: str, text: str) -> None:
        """A line the kernel process printed on stdout or stderr."""

    def on_kernel_exit(self, kernel: Kernel, code: int) -> None:
        """The process exited (or an adopted kernel was let go)."""

    def on_spawn_failed(self, reason: str) -> None: ...

    def on_heartbeat(self, alive: bool) -> None: ...

    def on_handshake(self, info: ConnectionInfo) -> None:
        """JEP 66: the kernel reported the ports it bound."""


class Lifecycle(enum.Enum):
    """Where an incarnation is. `Kernel.exited` and `Kernel.finished` are the Events to wait
    on; this says where it is."""

    #: Spawned (or adopting), sockets opening, kernel_info not answered yet.
    STARTING = "starting"
    #: kernel_info answered; messages are relayed.
    RUNNING = "running"
    #: The process exited (or an adopted kernel was let go) after it ran.
    EXITED = "exited"
    #: It ended without ever running: spawn failed, exited or timed out during startup.
    FAILED = "failed"


class Kernel:
    def __init__(
        self,
        events: KernelEvents,
        params: KernelParams,
        *,
        info: ConnectionInfo | None,
        plan: LaunchPlan | None,
        ports: PortReservation | None,
        retry_on_port_conflict: bool = False,
        attached: ProcessRef | None = None,
    ) -> None:
        self.events = events
        #: A running kernel process we did not start: re-attached after a daemon crash. Not
        #: our child, so its exit is watched through a pidfd (or polled), not waited for.
        self.attached = attached
        #: Set when the process is gone; the output followers then read what is left and end.
        self._process_gone = trio.Event()
        #: We asked it to end (shutdown or restart): a re-attached kernel's exit code, which
        #: we cannot know, is then reported as 0.
        self._stopping = False
        self.params = params
        self.info = info
        self.plan = plan
        self.ports = ports
        self.process: trio.Process | None = None
        self.returncode: int | None = None
        self.lifecycle = Lifecycle.STARTING
        self.exited = trio.Event()
        #: Set once the incarnation is over: process reaped, sockets closed, ports and files
        #: released (the next incarnation reuses the connection file's path).
        self.finished = trio.Event()
        #: The kernel could not bind a port we picked for it: another process took the port
        #: between our check and the kernel's bind (the port race; see connection.py).
        self.port_conflict = False
        #: Set by the session when it will start a fresh incarnation on fresh ports after a
        #: port conflict, so that this one's exit is not reported to clients.
        self.retry_on_port_conflict = retry_on_port_conflict
        self._address_in_use_printed = False
        self._signer = params.signer
        self._identity = zmq_identity(params.session_id)
        self._sockets: dict[str, TrioSocket] = {}
        self._scope = trio.CancelScope()
        self._output = StartupOutput()
        self._readers_done = trio.Event()
        self._open_readers = 0
        self._probe = Probe()
        #: Set once our stdin socket's connection to the kernel completed its handshake.
        self._stdin_connected = trio.Event()
        # Read on the message path for every message: kept at hand (see Probe).
        self._probe_ids = self._probe.ids
        self._iopub_seen = self._probe.iopub_seen
        #: Our kernel_info_request on shell was answered: no cell runs (or ran until then).
        #: Set during start, except for a re-attached kernel that was running a cell.
        self.shell_answered = self._probe.shell_answered

    def __repr__(self) -> str:
        return (f"<Kernel session={self.params.session_id!r} pid={self.pid} "
                f"{self.lifecycle.value}>")

    @property
    def pid(self) -> int | None:
        if self.attached is not None:
            return None if self._process_gone.is_set() else self.attached.pid
        if self.process is None or self.returncode is not None:
            return None
        return self.process.pid

    @property
    def started(self) -> bool:
        """kernel_info was answered (it may have exited since)."""
        return self.lifecycle is Lifecycle.RUNNING or self.lifecycle is Lifecycle.EXITED

    @property
    def running(self) -> bool:
        """Started and not exited: requests can be sent."""
        return self.lifecycle is Lifecycle.RUNNING

    def _mark_exited(self) -> None:
        self.lifecycle = Lifecycle.EXITED if self.started else Lifecycle.FAILED
        self.exited.set()

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
                                self.params.key,
                                int(registration.last_endpoint.rsplit(":", 1)[1]),
                            )
                        if self.plan is not None:
                            await self._spawn(nursery)
                        elif self.attached is not None:
                            self._follow(nursery, from_end=True)
                            nursery.start_soon(self._watch_attached, name="process watch")
                        if registration is not None:
                            # The socket stays open until the incarnation ends: closing it
                            # now could discard the reply before libzmq has sent it.
                            self.info = await handshake(registration, self.params, self._output)
                            self.events.on_handshake(self.info)
                        for channel in ("shell", "control", "stdin"):
                            sock = await stack.enter_async_context(self._open(channel))
                            self._sockets[channel] = sock
                            nursery.start_soon(self._pump, channel, sock, name=f"pump {channel}")
                        iopub = await stack.enter_async_context(self._open_iopub())
                        nursery.start_soon(self._pump_iopub, iopub, name="pump iopub")
                        if self.attached is not None:
                            # Answered once any cell it is running is over (shell_answered).
                            await self._probe.send(self._send_shell_probe)
                        reply = await self._probe.run(
                            self._send_probe, timeout=self.params.startup_timeout,
                            retry=self.params.timeouts.kernel_info_retry)
                        if reply is None:
                            raise self._startup_failure(exited=False)
                        await self._wait_for_stdin()
                    except StartupFailure as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()
                    except zmq.ZMQError as exc:
                        failure = StartupFailure(
                            SessionConnectionFailed(str(exc)), output=self._output.clean()
                        )
                        nursery.cancel_scope.cancel()
                    else:
                        self.lifecycle = Lifecycle.RUNNING
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
            self.params.zmq_context, zmq.REP, bind="tcp://127.0.0.1:0", name="registration"
        )

    async def _spawn(self, nursery: trio.Nursery) -> None:
        assert self.plan is not None
        try:
            self.process = await launch.spawn(self.plan.command, self.plan.env, self.plan.cwd,
                                              self.params.output_files)
        except OSError as exc:
            self.events.on_spawn_failed(f"failed to spawn process: {exc}")
            raise StartupFailure(ProcessStartFailed(str(exc)), exit_code=exc.errno) from None
        log.info(
            "session %s: started kernel pid %d: %s",
            self.params.session_id,
            self.process.pid,
            launch.describe_command(self.plan.command),
        )
        if self.params.output_files is not None:
            self._follow(nursery, from_end=False)
        else:
            for name, stream in (("stdout", self.process.stdout),
                                 ("stderr", self.process.stderr)):
                assert stream is not None
                self._open_readers += 1
                nursery.start_soon(self._read_output, name, stream, name=f"read {name}")
        nursery.start_soon(self._watch_process, name="process watch")

    def _follow(self, nursery: trio.Nursery, *, from_end: bool) -> None:
        if self.params.output_files is None:
            return
        for name, path in zip(("stdout", "stderr"), self.params.output_files, strict=True):
            self._open_readers += 1
            nursery.start_soon(self._follow_output, name, path, from_end, name=f"follow {name}")

    def _url(self, channel: str) -> str:
        assert self.info is not None
        return f"{self.info.transport}://{self.info.ip}:{getattr(self.info, channel + '_port')}"

    def _open(self, channel: str) -> Any:
        return open_socket(
            self.params.zmq_context, zmq.DEALER, connect=self._url(channel),
            identity=self._identity, name=channel, sndhwm=0, tick=SOCKET_TICK,
            handshake=self._stdin_connected if channel == "stdin" else None,
        )

    async def _wait_for_stdin(self) -> None:
        """Do not call the kernel up before our stdin socket is connected to it.

        The kernel speaks first on stdin: its ROUTER sends an `input_request` to our identity
        and silently drops it if no connection with that identity has completed its handshake
        yet. Our DEALERs connect before the kernel has bound its ports and retry every 100 ms
        or so, each on its own timer, so a kernel that answers kernel_info quickly can be
        running (and a client's first cell calling `input()` or R's `readline()`) before the
        stdin socket's next retry: the prompt was lost and the cell hung. Shell and control
        need no such wait: we speak first there, and ZeroMQ holds what we send until the
        connection is up. A kernel that never binds stdin only costs this wait's bound.
        """
        with trio.move_on_after(self.params.startup_timeout):
            await self._stdin_connected.wait()
            return
        log.warning("session %s: the kernel's stdin channel did not connect within %g s; "
                    "prompts for input (input(), readline()) may not reach the client",
                    self.params.session_id, self.params.startup_timeout)

    def _open_iopub(self) -> Any:
        # Our own accounting bounds the backlog (the outbox); libzmq must not drop silently.
        # libzmq may hold up to IOPUB_RCVHWM messages while a slow client holds the pump back;
        # past that the kernel's PUB applies its own high-water mark.
        return open_subscription(self.params.zmq_context, self._url("iopub"),
                                 rcvhwm=IOPUB_RCVHWM, name="iopub", tick=SOCKET_TICK)

    # ---- startup -----------------------------------------------------------------------

    async def _send_probe(self, msg_id: str) -> None:
        # A re-attached kernel may be busy running a cell, which holds its shell channel;
        # control answers kernel_info meanwhile.
        channel = "control" if self.attached is not None else "shell"
        await self.send_request(channel, "kernel_info_request", {}, msg_id=msg_id)

    async def _send_shell_probe(self, msg_id: str) -> None:
        await self.send_request("shell", "kernel_info_request", {}, msg_id=msg_id)

    def startup_output(self) -> str:
        return self._output.clean()

    def _startup_failure(self, *, exited: bool) -> StartupFailure:
        return startup_failure(
            params=self.params, plan=self.plan, output=self._output,
            returncode=self.returncode, port_conflict=self.port_conflict,
            connected=self.info is not None, exited=exited,
        )

    # ---- tasks ---------------------------------------------------------------------------

    async def _read_output(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        try:
            while chunk := await stream.receive_some(65536):
                pending = output.split_lines(pending + chunk,
                                             lambda raw: self._on_line(name, raw))
            if pending:
                self._on_line(name, pending)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._open_readers -= 1
            if self._open_readers == 0:
                self._readers_done.set()

    async def _follow_output(self, name: str, path: Path, from_end: bool) -> None:
        """Pass on what the kernel appends to its output file, until the process is gone and
        the file read to its end; what was read is given back past a bound (output.py)."""
        try:
            await output.follow(path, from_end=from_end, gone=self._process_gone,
                                on_line=lambda raw: self._on_line(name, raw))
        except OSError as exc:
            log.warning("session %s: cannot follow the kernel's %s in %s: %s",
                        self.params.session_id, name, path, exc)
        finally:
            self._open_readers -= 1
            if self._open_readers == 0:
                self._readers_done.set()

    def _on_line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        if not self.started:
            self._output.add(text)
            if self.ports is not None and ADDRESS_IN_USE in text:
                self._on_address_in_use(text, self.ports)
        self.events.on_output(stream, text)

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
                        self.params.session_id, text.strip()[-200:])
            self._scope.cancel()

    async def _watch_process(self) -> None:
        assert self.process is not None
        self.returncode = await self.process.wait()
        self._process_gone.set()
        # Let the last lines the kernel printed arrive before its exit is reported.
        with trio.move_on_after(1.0):
            await self._readers_done.wait()
        if not self.started and self._address_in_use_printed:
            self.port_conflict = True
        log.info(
            "session %s: kernel pid %d exited (%s)",
            self.params.session_id,
            self.process.pid,
            launch.describe_exit(self.returncode),
        )
        self._mark_exited()
        self.events.on_kernel_exit(self, launch.exit_code_of(self.returncode))
        self._scope.cancel()

    async def _watch_attached(self) -> None:
        assert self.attached is not None
        await launch.wait_gone(self.attached)
        self._process_gone.set()
        with trio.move_on_after(1.0):
            await self._readers_done.wait()
        log.info("session %s: re-attached kernel pid %d exited", self.params.session_id,
                 self.attached.pid)
        self._mark_exited()
        self.events.on_kernel_exit(self, 0 if self._stopping else -1)
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
        events = self.events
        while True:
            try:
                batch = await iopub.receive_batch()
            except trio.ClosedResourceError:
                return  # the incarnation is ending
            await self._relay("iopub", batch)
            # A client that reads slower than the kernel writes holds the pump back (and so
            # the kernel, through ZeroMQ) instead of losing output.
            await events.wait_for_room()

    async def _relay(self, channel: str, batch: list[list[bytes]]) -> None:
        self.events.on_traffic()
        for frames in batch:
            due = self._on_frames(channel, frames)
            if due is not None:
                await self.send(due)

    def _on_frames(self, channel: str, frames: list[bytes]) -> wire.ClientMessage | None:
        try:
            msg = wire.parse_kernel_frames(frames, self._signer)
        except wire.WireError as exc:
            log.warning("session %s: dropped a %s message: %s",
                        self.params.session_id, channel, exc)
            return None
        if self._probe_ids and msg.parent_msg_id in self._probe_ids:
            self._probe.on_traffic(channel, msg)
            return None
        if channel == "iopub":
            self._iopub_seen.set()
        elif channel == "stdin":
            # Rare (a prompt for input), and a cell waiting on a prompt nobody saw is hard to
            # diagnose: this tells "never reached us" from "lost after us".
            log.debug("session %s: stdin %s (parent %s) via %r", self.params.session_id,
                      msg.msg_type, msg.parent_msg_id, msg.identities)
        return self.events.on_kernel_message(msg, channel)

    async def _heartbeat(self) -> None:
        assert self.info is not None
        timeouts = self.params.timeouts
        url = f"{self.info.transport}://{self.info.ip}:{self.info.hb_port}"
        while True:
            # A REQ socket that missed its reply cannot send again: use a fresh one each time.
            hb = self.params.zmq_context.socket(zmq.REQ)
            try:
                hb.linger = 0
                hb.connect(url)
                alive = True
                while alive:
                    alive = await round_trip(hb, [HEARTBEAT_PAYLOAD], timeouts.heartbeat_reply)
                    self.events.on_heartbeat(alive)
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
            session=self.params.session_id,
            username=self.params.username,
            version=self.params.protocol_version,
            date=wire.now_date(),
            signer=self._signer,
            identity=self._identity if channel in ("shell", "stdin") else None,
            **fields,
        )
        await sock.send(frames)

    @property
    def retrying(self) -> bool:
        """This incarnation failed on a port conflict and the session starts another."""
        return self.port_conflict and self.retry_on_port_conflict

    def signal(self, sig: signal.Signals) -> bool:
        pid = self.pid
        return pid is not None and launch.signal_group(pid, sig)

    async def stop(self, *, restart: bool, grace: float) -> None:
        """Ask the kernel to shut down, then insist: SIGTERM, then SIGKILL, each bounded. (The
        session clears its execution queue before it calls this: session.Session._stop_kernel.)"""
        timeouts = self.params.timeouts
        self._stopping = True
        if self.running:
            try:
                await self.send_request("control", "shutdown_request", {"restart": restart})
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        if self.process is None and self.attached is None:
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
                        self.params.session_id, sig.name)
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
                with trio.move_on_after(self.params.timeouts.kill):
                    self.returncode = await self.process.wait()
            elif self.returncode is None:
                self.returncode = returncode
            # Children the kernel started may outlive it in its group; end them too.
            launch.signal_group(pid, signal.SIGKILL)
            if not self.exited.is_set() and self.returncode is not None:
                self._mark_exited()
                self.events.on_kernel_exit(self, launch.exit_code_of(self.returncode))
        elif self.attached is not None:
            if not self._process_gone.is_set():
                launch.signal_group(self.attached.pid, signal.SIGKILL)
                with trio.move_on_after(self.params.timeouts.kill):
                    await launch.wait_gone(self.attached)
                    self._process_gone.set()
            launch.signal_group(self.attached.pid, signal.SIGKILL)
            if not self.exited.is_set():
                self._mark_exited()
                self.events.on_kernel_exit(self, 0 if self._stopping else -1)
        elif not self.exited.is_set():
            self._mark_exited()
            self.events.on_kernel_exit(self, 0)
        if self.params.output_files is not None and (
                self.process is not None or self.attached is not None):
            for path in self.params.output_files:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self.ports is not None:
            self.ports.release()
        if self.plan is not None:
            try:
                os.unlink(self.plan.connection_file)
            except OSError:
                pass
