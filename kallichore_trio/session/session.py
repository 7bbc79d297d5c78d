"""KernelSession: one Kallichore session, from `PUT /sessions` to `DELETE`.

The session outlives its kernels: start, restart and adopt each create a `Kernel` (one
incarnation) that runs in the session's nursery. What the client sees goes through one path:

    kernel pumps -> on_kernel_message (state machine, execution queue, cwd) -> outbox -> client
    client reader -> deliver (execution queue) -> Kernel.send -> zmq owner task -> kernel

Exactly one client is attached at a time; a new one evicts the old one. Frames produced while no
client is attached stay in the outbox and go to the next client, in order.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
import zmq

from kallichore_trio import wire
from kallichore_trio.config import Config
from kallichore_trio.errors import (
    KallichoreError,
    NoProcess,
    ProcessStartFailed,
    RestartFailed,
    SessionInterruptFailed,
    SessionNotFound,
    SessionNotRunning,
    StartupFailure,
)
from kallichore_trio.models import (
    ActiveSession,
    ConnectionInfo,
    ExecutionQueueModel,
    HistoryEntry,
    NewSession,
    ResourceUsage,
    Status,
    VarAction,
    converter,
    dump,
)
from kallichore_trio.security import session_socket_check
from kallichore_trio.session import launch
from kallichore_trio.session.connection import (
    PortReservation,
    connection_info,
    new_key,
    registration_file_path,
    reserve_ports,
    uses_handshake,
    write_kernel_connection_file,
)
from kallichore_trio.session.executions import Executions
from kallichore_trio.session.kernel import Kernel, LaunchPlan
from kallichore_trio.session.outbox import Outbox
from kallichore_trio.session.queue import ExecutionQueue, QueueFull
from kallichore_trio.session.state import IDLE_LIKE, SessionState
from kallichore_trio.wsconn import (
    ClientConnection,
    ClientGone,
    FileIdentity,
    file_identity,
    serve_unix_socket,
)

log = logging.getLogger(__name__)

#: Client messages held while no kernel is connected (delivered to the next one).
HELD_LIMIT = 1000
#: Start attempts, each on freshly picked ports, when the kernel finds a port taken.
PORT_ATTEMPTS = 3
EVICTED_REASON = "Another client is connecting to this session."
#: Frames whose loss under overflow costs little: output that a later frame supersedes.
_DROPPABLE_IOPUB = frozenset({"stream"})
#: What a send or receive on a client connection raises once the client is gone.
_CLIENT_GONE = (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError)
#: A batch this long is written without lingering for more.
_LINGER_UNTIL_FRAMES = 64


@attrs.define(eq=False)
class ClientSlot:
    """The attached client: its connection, and the scope that ends its tasks."""

    conn: ClientConnection
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    evicted: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    pings_sent: int = 0
    #: When the write in progress began (trio clock), or None between writes.
    write_started: float | None = None
    #: The per-session Unix socket the client came through (None on TCP).
    socket_path: str | None = None


@attrs.frozen
class ChannelSocket:
    """A session's listening Unix socket (socket transport), and the scope that ends it."""

    path: Path
    identity: FileIdentity | None
    scope: trio.CancelScope

    def intact(self) -> bool:
        """Is the file at `path` still the one our listener is bound to? (Something outside
        the daemon, a temp-dir cleaner say, may have removed it.)"""
        return self.identity is not None and file_identity(self.path) == self.identity


class KernelSession:
    def __init__(
        self,
        model: NewSession,
        *,
        config: Config,
        zmq_context: zmq.Context[Any],
        runtime_dir: Path,
        on_activity: Callable[[], None] = lambda: None,
        on_traffic: Callable[[], None] = lambda: None,
    ) -> None:
        self.model = model
        self.session_id = model.session_id
        self.config = config
        self.zmq_context = zmq_context
        self.runtime_dir = runtime_dir
        self.on_activity = on_activity
        self.on_traffic = on_traffic
        self.key = new_key()
        self.signer = wire.Signer(self.key.encode())
        self.protocol_version = model.protocol_version or "5.3"
        self.created = dt.datetime.now(dt.UTC)
        self.state = SessionState(idle_since=trio.current_time())
        #: Executions followed for the history and for POST /execute (executions.py).
        self.executions = Executions()
        self.queue = ExecutionQueue(on_dropped=self.executions.dropped)
        self.outbox = Outbox(max_frames=config.outbox.max_frames,
                             max_bytes=config.outbox.max_bytes)
        self.working_directory = model.working_directory
        self.env_actions: list[VarAction] = list(model.env)
        self.initial_env: dict[str, str] = {}
        self.kernel_info: dict[str, Any] = {}
        self.input_prompt = model.input_prompt
        self.continuation_prompt = model.continuation_prompt
        self.connection: ConnectionInfo | None = None
        self.kernel: Kernel | None = None
        self.client: ClientSlot | None = None
        self._channel_socket: ChannelSocket | None = None
        self._channel_socket_lock = trio.Lock()
        self.resource_usage: ResourceUsage | None = None
        self.restarting = False
        self._adopt_ports: PortReservation | None = None
        self._lifecycle = trio.Lock()
        self._held: deque[wire.ClientMessage] = deque()
        self._changed = trio.Event()
        self._room = trio.Event()
        self._linger: trio.CancelScope | None = None  # the writer holding output back
        self._high_water = max(1, config.outbox.max_frames // 2)
        self._nursery: trio.Nursery | None = None
        #: Variables added to every kernel's environment (the registry's; MCP sets it).
        self.extra_env: Callable[[KernelSession], dict[str, str]] = lambda _: {}

    def __repr__(self) -> str:
        pid = self.kernel.pid if self.kernel else None
        return (
            f"<KernelSession {self.session_id!r} {self.state.status} pid={pid} "
            f"connected={self.connected} outbox={len(self.outbox)}>"
        )

    # ---- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session's own nursery: kernels and client tasks live here until it is closed."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            if self._adopt_ports is not None:
                self._adopt_ports.release()

    def close(self) -> None:
        """End the session's tasks (after its kernel is gone)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def connected(self) -> bool:
        return self.client is not None

    @property
    def socket_path(self) -> str | None:
        """The per-session socket the connected client came through, if any."""
        return self.client.socket_path if self.client is not None else None

    @property
    def status(self) -> Status:
        return self.state.status

    # ---- frames to the client ------------------------------------------------------------

    def emit(self, text: str, *, droppable: bool = False, urgent: bool | None = None) -> None:
        """Queue a frame for the client. Urgent frames (by default all but droppable output)
        are written at once; the others may wait for company (Config.output_linger)."""
        self.outbox.append(text, droppable=droppable, urgent=urgent)
        if self._linger is not None and not self.outbox.can_wait:
            self._linger.cancel()  # a status or reply: write what is pending now
        self._changed.set()

    async def wait_for_room(self) -> None:
        """Backpressure: while a client is attached and behind by more than the high-water
        mark, wait until it catches up. With no client attached nobody drains the outbox, so
        it sheds droppable output instead (see outbox.py)."""
        while self.client is not None and len(self.outbox) > self._high_water:
            self._room = trio.Event()
            await self._room.wait()

    def set_status(self, new: Status, reason: str | None) -> None:
        if not self.state.set(new, trio.current_time()):
            return
        if new == "exited":
            self.queue.clear()
            self.executions.kernel_exited()
        self.executions.status_changed()
        self.emit(wire.status_event(new, reason))
        if new in IDLE_LIKE:
            self.on_activity()

    # ---- callbacks from the kernel (the hot path) ---------------------------------------

    def on_kernel_message(
        self, msg: wire.KernelMessage, channel: str
    ) -> wire.ClientMessage | None:
        """Account for a kernel message and relay it; return a queued request now due."""
        due = None
        droppable = False
        if channel == "iopub":
            msg_type = msg.msg_type
            if msg_type == "status":
                due = self._on_status(msg)
            droppable = msg_type in _DROPPABLE_IOPUB
        elif channel == "shell" and msg.msg_type == "execute_reply":
            due = self.queue.finished(msg.parent_msg_id)
        if self.executions.followed:  # nothing more for a message while nothing is followed
            self.executions.observe(msg)
        self.emit(wire.relay_frame(msg, channel), droppable=droppable)
        if due is not None:
            self.executions.sent(due.msg_id)  # the caller sends it now
        return due

    def _on_status(self, msg: wire.KernelMessage) -> wire.ClientMessage | None:
        content = msg.content_json()
        state = content.get("execution_state") if isinstance(content, dict) else None
        if state not in ("busy", "idle"):
            return None
        reason = msg.parent_msg_type
        self.set_status(state, reason)
        if state != "idle":
            return None
        if reason == "execute_request":
            self._check_working_directory()
        return self.queue.finished(msg.parent_msg_id)

    def _check_working_directory(self) -> None:
        pid = self.kernel.pid if self.kernel else None
        cwd = launch.process_cwd(pid) if pid else None
        if cwd and cwd != self.working_directory:
            self.working_directory = cwd
            self.emit(wire.working_dir_changed_event(cwd))

    def on_output(self, stream: str, text: str) -> None:
        self.emit(wire.output_event(stream, text), droppable=True)

    def on_kernel_exit(self, kernel: Kernel, code: int) -> None:
        if kernel is not self.kernel or kernel.retrying:
            return  # a stale incarnation, or one about to be replaced on fresh ports
        reason = (
            "child process exited"
            if kernel.process is not None
            else "all sockets disconnected from an adopted kernel"
        )
        self.set_status("exited", reason)
        self.emit(wire.exited_event(code))

    def on_spawn_failed(self, reason: str) -> None:
        self.set_status("exited", reason)

    def on_heartbeat(self, alive: bool) -> None:
        status = self.state.status
        if alive and status == "offline":
            self.set_status(self.state.before_offline or "idle",
                            "heartbeat detected after offline")
        elif not alive and status in ("idle", "ready"):
            # A busy kernel may legitimately miss beats (IRkernel answers none while busy),
            # and its process is alive: only a quiet, unanswering kernel is offline.
            log.warning("session %s: lost heartbeat", self.session_id)
            self.set_status("offline", "lost heartbeat")

    def on_resource_usage(self, usage: ResourceUsage) -> None:
        self.resource_usage = usage
        # Droppable (a newer sample supersedes it) but urgent: it comes alone, once a period,
        # so holding it back for company would only cost the writer a second wake-up.
        self.emit(wire.resource_usage_event(dump(usage)), droppable=True, urgent=True)

    def on_handshake(self, info: ConnectionInfo) -> None:
        self.connection = info
        self.emit(wire.handshake_completed_event(self.session_id, dump(info)))

    # ---- messages from the client --------------------------------------------------------

    async def deliver(self, msg: wire.ClientMessage) -> None:
        """A client message on its way to the kernel, through the execution queue."""
        self.on_traffic()
        if msg.msg_type == "execute_request" and _has_code(msg):
            self.executions.requested(msg)
            try:
                send_now = self.queue.submit(msg)
            except QueueFull as exc:
                log.warning("session %s: dropped execute_request %s: %s",
                            self.session_id, msg.msg_id, exc)
                self.executions.dropped([msg])
                return
            if not send_now:
                self.emit(wire.execution_queued_event(msg.msg_id))
                return
            self.executions.sent(msg.msg_id)
        elif msg.msg_type in ("interrupt_request", "shutdown_request"):
            self.queue.clear()
        await self._send(msg)

    async def _send(self, msg: wire.ClientMessage) -> None:
        kernel = self.kernel
        if kernel is None or not kernel.connected or self._held:
            if len(self._held) >= HELD_LIMIT:
                dropped = self._held.popleft()
                log.warning("session %s: no kernel to receive %s; dropped the oldest held "
                            "message %s", self.session_id, msg.msg_type, dropped.msg_id)
            self._held.append(msg)
            return
        await kernel.send(msg)

    async def _flush_held(self, kernel: Kernel) -> None:
        while self._held and kernel.connected:
            await kernel.send(self._held.popleft())

    async def send_own_request(
        self, kernel: Kernel, channel: str, msg_type: str, content: dict[str, Any]
    ) -> str:
        if msg_type in ("interrupt_request", "shutdown_request"):
            self.queue.clear()
        return await kernel.send_request(channel, msg_type, content)

    # ---- lifecycle operations (HTTP) -----------------------------------------------------

    def _startup_timeout(self) -> float:
        timeout = self.model.connection_timeout
        if timeout is None or timeout <= 0:
            return self.config.timeouts.default_connection
        return float(timeout)

    async def start(self) -> dict[str, Any]:
        """Start the kernel; return its kernel_info_reply content (StartupFailure otherwise)."""
        async with self._lifecycle:
            if self.kernel is not None and not self.kernel.exited.is_set():
                return self.kernel_info  # already running: start is idempotent here
            return await self._start_locked()

    async def _start_locked(self) -> dict[str, Any]:
        if not self.model.argv:
            raise StartupFailure(ProcessStartFailed("No arguments provided"))
        previous = self.kernel
        if previous is not None:
            # Its cleanup removes the connection file whose path the new kernel reuses.
            with trio.move_on_after(self.config.timeouts.kill):
                await previous.finished.wait()
        self.set_status("starting", "start API called")
        assert self._nursery is not None
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                kernel = self._prepare_kernel(retry_on_port_conflict=attempt < PORT_ATTEMPTS)
            except KallichoreError as exc:
                self.set_status("exited", str(exc))
                raise StartupFailure(exc) from None
            self.kernel = kernel
            try:
                reply: dict[str, Any] = await self._nursery.start(self._run_kernel, kernel)
            except StartupFailure:
                if not kernel.retrying:
                    raise
                log.warning("session %s: port conflict on start attempt %d of %d; "
                            "starting again on fresh ports",
                            self.session_id, attempt, PORT_ATTEMPTS)
                continue
            self._on_started(reply, parse_prompts=True)
            return reply
        raise AssertionError("unreachable: the last attempt never retries")

    def _prepare_kernel(self, *, retry_on_port_conflict: bool) -> Kernel:
        cwd = self.working_directory
        if not os.path.isdir(cwd):
            # As the reference does: a project folder that was moved or deleted must still
            # give the user a console, so the kernel starts in the daemon's own directory, and
            # the client is told why (as kernel output, kept for a client not yet connected).
            missing = cwd
            try:
                cwd = os.getcwd()
            except OSError as exc:  # the daemon's own directory is gone too
                raise ProcessStartFailed(
                    f"the working directory '{missing}' does not exist or is not a directory, "
                    f"and neither does the daemon's ({exc})"
                ) from None
            log.warning("session %s: working directory %r does not exist or is not a "
                        "directory; starting the kernel in %r", self.session_id, missing, cwd)
            self.emit(wire.output_event(
                "stderr",
                f"The working directory '{missing}' does not exist or is not a directory; "
                f"the kernel starts in '{cwd}' instead.\n",
            ))
            self.working_directory = cwd
            self.emit(wire.working_dir_changed_event(cwd))
        ports = None
        info = None
        handshake = uses_handshake(self.protocol_version)
        try:
            if handshake:
                path = registration_file_path(self.runtime_dir, self.session_id)
            else:
                ports = reserve_ports()
                info = connection_info(ports.ports, self.key)
                path = write_kernel_connection_file(self.runtime_dir, self.session_id, info)
                self.connection = info
        except OSError as exc:
            if ports is not None:
                ports.release()
            raise ProcessStartFailed(f"could not prepare the connection file: {exc}") from None
        argv = launch.substitute_connection_file(self.model.argv, path)
        env = launch.resolve_env(os.environ, self.env_actions)
        env.update(self.extra_env(self))  # MCP: POSITRON_MCP_URL/TOKEN (docs/mcp.md)
        self.initial_env = env
        command = launch.build_command(self.model, argv, cwd)
        shell = command[0] if command[:1] != argv[:1] else None
        plan = LaunchPlan(command=command, env=env, cwd=cwd, shell=shell,
                          connection_file=path, handshake=handshake)
        return Kernel(self, info=info, plan=plan, ports=ports,
                      startup_timeout=self._startup_timeout(),
                      retry_on_port_conflict=retry_on_port_conflict)

    async def _run_kernel(self, kernel: Kernel, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            await kernel.run(task_status=task_status)
        except Exception:
            if not kernel.started:
                raise
            # After start nothing may escape into the session nursery: that would end every
            # other task of the session. Log it; the kernel's exit is already reported.
            log.exception("session %s: kernel task failed", self.session_id)

    def _on_started(self, reply: dict[str, Any], *, parse_prompts: bool) -> None:
        self.kernel_info = reply
        if parse_prompts:
            positron = (reply.get("language_info") or {}).get("positron") or {}
            if isinstance(positron.get("input_prompt"), str):
                self.input_prompt = positron["input_prompt"]
            if isinstance(positron.get("continuation_prompt"), str):
                self.continuation_prompt = positron["continuation_prompt"]
        self.set_status("idle", "kernel_info_reply")
        assert self._nursery is not None
        if self.kernel is not None and self._held:
            self._nursery.start_soon(self._flush_held, self.kernel)

    async def restart(self, working_directory: str | None, env: list[VarAction] | None) -> None:
        if self.restarting:
            raise StartupFailure(RestartFailed("Kernel is already restarting"))
        self.restarting = True
        try:
            async with self._lifecycle:
                self._restart_working_directory(working_directory)
                if env:
                    self.env_actions = list(env)
                kernel = self.kernel
                if kernel is not None and not kernel.exited.is_set():
                    await kernel.stop(restart=True,
                                      grace=self.config.timeouts.shutdown_request)
                await self._start_locked()
        finally:
            self.restarting = False

    def _restart_working_directory(self, requested: str | None) -> None:
        if requested:
            path = Path(requested).expanduser()
            try:
                resolved = path.resolve(strict=True)
            except OSError:
                resolved = None
            if resolved is not None and resolved.is_dir():
                self.working_directory = str(resolved)
                return
            log.warning("session %s: restart working directory %r is not a directory; ignored",
                        self.session_id, requested)
        self._check_working_directory()

    async def adopt(self, info: ConnectionInfo) -> dict[str, Any]:
        async with self._lifecycle:
            # Signed with the session's own key (the kernel got it from connection_info).
            info = attrs.evolve(info, key=self.key)
            self.connection = info
            kernel = Kernel(self, info=info, plan=None, ports=None,
                            startup_timeout=self._startup_timeout())
            self.kernel = kernel
            assert self._nursery is not None
            reply: dict[str, Any] = await self._nursery.start(self._run_kernel, kernel)
            self._on_started(reply, parse_prompts=False)
            return reply

    def get_connection_info(self) -> ConnectionInfo:
        if self.connection is None:
            self._adopt_ports = reserve_ports()
            self.connection = connection_info(self._adopt_ports.ports, self.key)
        return self.connection

    async def interrupt(self) -> None:
        kernel = self.kernel
        if self.model.interrupt_mode == "signal":
            pid = kernel.pid if kernel else None
            if pid is None:
                raise SessionInterruptFailed(self.session_id, "No process ID to interrupt")
            self.queue.clear()
            if not kernel or not kernel.signal(signal.SIGINT):
                raise SessionInterruptFailed(self.session_id, f"Process {pid} not found")
            return
        if kernel is None or not kernel.connected:
            raise SessionInterruptFailed(self.session_id, "the kernel is not running")
        await self.send_own_request(kernel, "control", "interrupt_request", {})

    def kill(self) -> None:
        if self.state.status == "exited":
            raise SessionNotRunning(self.session_id)
        kernel = self.kernel
        if kernel is None or kernel.pid is None:
            raise NoProcess(self.session_id)
        self.queue.clear()
        kernel.kill()

    async def shutdown(self) -> None:
        """End the kernel for good: shutdown_request, then SIGTERM, then SIGKILL."""
        kernel = self.kernel
        if kernel is not None and not kernel.exited.is_set():
            await kernel.stop(restart=False, grace=self.config.timeouts.shutdown_request)
            with trio.move_on_after(self.config.timeouts.kill):
                await kernel.exited.wait()

    # ---- the client ----------------------------------------------------------------------

    async def channel_socket(self, new_path: Callable[[], Path]) -> Path:
        """The session's Unix socket for clients (socket transport).

        The first call binds it at `new_path()` in the session's nursery; it then listens until
        the session ends, and every later call returns the same path. Asking again therefore
        disturbs nobody: a connected client is evicted only when a new one connects
        (`serve_client`), and no listener is ever torn down or re-bound under a client that is
        about to connect. Only if the file has gone is a new socket bound, at a new path.
        Raises what `new_path` raises (SocketPathTooLong), OSError if the bind fails, and
        SessionNotFound if the session was deleted meanwhile.
        """
        async with self._channel_socket_lock:
            if self._nursery is None or self._nursery.cancel_scope.cancel_called:
                raise SessionNotFound(self.session_id)
            current = self._channel_socket
            if current is not None and current.intact():
                return current.path
            if current is not None:
                log.warning("session %s: socket %s has gone; binding a new one",
                            self.session_id, current.path)
                current.scope.cancel()
                self._channel_socket = None
            path = new_path()
            scope = trio.CancelScope()
            await self._nursery.start(self._listen, path, scope)
            self._channel_socket = ChannelSocket(path, file_identity(path), scope)
            return path

    async def _listen(self, path: Path, scope: trio.CancelScope, *,
                      task_status: trio.TaskStatus[Path]) -> None:
        with scope:
            await serve_unix_socket(
                path, partial(self.serve_client, socket_path=str(path)),
                authorize=session_socket_check(self.config),
                handshake_timeout=self.config.timeouts.socket_handshake, task_status=task_status)

    async def serve_client(self, conn: ClientConnection, *,
                           socket_path: str | None = None) -> None:
        """Run one client until it leaves or a newer client evicts it."""
        previous = self.client
        slot = ClientSlot(conn, socket_path=socket_path)
        self.client = slot
        self.on_activity()
        if previous is not None:
            previous.evicted = True
            self._changed.set()
            # Let the old writer finish the frame it is sending; then it is cut off.
            with trio.move_on_after(2.0):
                await previous.done.wait()
            previous.scope.cancel()
            with trio.move_on_after(2.0):
                await previous.done.wait()
        log.info("session %s: client connected", self.session_id)
        try:
            with slot.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._client_reader, slot)
                    nursery.start_soon(self._client_keepalive, slot)
                    await self._client_writer(slot)
                    nursery.cancel_scope.cancel()
        finally:
            if self.client is slot:
                self.client = None
                self._room.set()
            slot.done.set()
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                if slot.evicted:
                    try:
                        await conn.send_text(wire.client_disconnected_event(EVICTED_REASON))
                    except _CLIENT_GONE:
                        pass
                await conn.close()
            log.info("session %s: client %s", self.session_id,
                     "evicted" if slot.evicted else "disconnected")

    async def _client_writer(self, slot: ClientSlot) -> None:
        """Outbox -> client, in order, a batch per socket write; a batch is released only once
        it was written. The write timeout is enforced by `_client_keepalive`, which aborts the
        connection under a stuck write (a cancel scope cannot: Hypercorn shields its writes)."""
        while not slot.evicted:
            batch = self.outbox.read()
            if batch.missed:
                log.warning("session %s: the outbox overflowed; %d frames were dropped",
                            self.session_id, batch.missed)
                # Tell the user, through an event Positron shows in the kernel's output.
                notice = (f"[kallichore-trio] {batch.missed} output frames were dropped while "
                          "no client was reading\n")
                try:
                    await slot.conn.send_text(wire.output_event("stderr", notice))
                except _CLIENT_GONE:
                    return
            if not batch.frames:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            if self.outbox.can_wait and len(batch.frames) < _LINGER_UNTIL_FRAMES:
                # Only output so far: let more join it (see Config.output_linger).
                with trio.move_on_after(self.config.output_linger) as self._linger:
                    await trio.sleep_forever()
                self._linger = None
                batch = self.outbox.read()
            slot.write_started = trio.current_time()
            try:
                await slot.conn.send_texts([text for _, text in batch.frames])
            except _CLIENT_GONE:
                return
            finally:
                slot.write_started = None
            self.outbox.ack(batch.frames[-1][0])
            if len(self.outbox) <= self._high_water:
                self._room.set()

    async def _client_reader(self, slot: ClientSlot) -> None:
        try:
            while (text := await slot.conn.receive_text()) is not None:
                try:
                    msg = wire.parse_client_frame(text)
                except wire.ClientFrameError as exc:
                    log.warning("session %s: dropped a client frame: %s", self.session_id, exc)
                    continue
                await self.deliver(msg)
        except _CLIENT_GONE:
            pass
        slot.scope.cancel()

    async def _client_keepalive(self, slot: ClientSlot) -> None:
        """Ping every period with an 8-byte counter. A client is dropped when more than 3 pings
        are unanswered or a write has been stuck for the write timeout."""
        period = self.config.timeouts.client_ping
        write_timeout = self.config.timeouts.client_write
        tick = min(period, write_timeout)
        next_ping = trio.current_time() + period  # the first Ping one period after connecting
        while True:
            await trio.sleep(tick)
            last = slot.conn.last_pong
            answered = int.from_bytes(last, "big") if last and len(last) == 8 else 0
            started = slot.write_started
            now = trio.current_time()
            if slot.pings_sent - answered > 3:
                reason = f"{slot.pings_sent - answered} pings unanswered"
            elif started is not None and now - started > write_timeout:
                reason = f"a write blocked for over {write_timeout:g} s"
            else:
                if now >= next_ping:
                    next_ping = now + period
                    slot.pings_sent += 1
                    # The Ping waits behind a stuck write; it is then one more unanswered.
                    with trio.move_on_after(tick):
                        try:
                            await slot.conn.ping(slot.pings_sent.to_bytes(8, "big"))
                        except _CLIENT_GONE:
                            slot.scope.cancel()
                            return
                continue
            log.warning("session %s: lost connection with client (%s)", self.session_id, reason)
            await slot.conn.abort()
            slot.scope.cancel()
            return

    # ---- the HTTP view -------------------------------------------------------------------

    def to_model(self) -> ActiveSession:
        now = trio.current_time()
        return ActiveSession(
            session_id=self.session_id,
            argv=list(self.model.argv),
            process_id=self.kernel.pid if self.kernel else None,
            username=self.model.username,
            display_name=self.model.display_name,
            language=self.model.language,
            interrupt_mode=self.model.interrupt_mode,
            initial_env=self.initial_env,
            connected=self.connected,
            started=self.created,
            session_mode=self.model.session_mode,
            working_directory=self.working_directory,
            notebook_uri=self.model.notebook_uri,
            input_prompt=self.input_prompt,
            continuation_prompt=self.continuation_prompt,
            execution_queue=converter.structure(self.queue.to_dict(), ExecutionQueueModel),
            status=self.state.status,
            kernel_info=self.kernel_info,
            resource_usage=self.resource_usage,
            idle_seconds=self.state.idle_seconds(now),
            busy_seconds=self.state.busy_seconds(now),
            socket_path=self.socket_path if self.connected else None,
            history=converter.structure(self.executions.recent(3), list[HistoryEntry]),
        )


def _has_code(msg: wire.ClientMessage) -> bool:
    return isinstance(msg.content, dict) and isinstance(msg.content.get("code"), str)
