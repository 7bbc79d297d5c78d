"""Session: one Kallichore session, from `PUT /sessions` to `DELETE`.

The session outlives its kernels: start, restart and adopt each create a `Kernel` (one
incarnation, kernel/kernel.py) that runs in the session's nursery and reports to the session
through `KernelEvents`, which the session implements. What the client sees goes through one
path; core.relay decides, the session carries it out:

    kernel pumps -> on_kernel_message (relay.kind_of, status_verdict; state, queue, cwd)
        -> outbox -> ClientChannel writer -> client
    ClientChannel reader -> deliver (relay.client_action; execution queue) -> Kernel.send
        -> zmq -> kernel

Exactly one client is attached at a time (a `ClientChannel`, client.py); a new one evicts the
old one. Frames produced while no client is attached stay in the outbox and go to the next
client, in order. Here: the lifecycle (start, restart, adopt, interrupt, kill, shutdown), the
KernelEvents callbacks, and attaching clients.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio
import zmq

from kallichore_trio import wire
from kallichore_trio.config import Config
from kallichore_trio.core.outbox import Outbox
from kallichore_trio.core.queue import ExecutionQueue, HeldMessages, QueueFull
from kallichore_trio.core.relay import (
    CLEAR_QUEUE_AND_SEND,
    EXECUTE,
    EXECUTE_REPLY,
    OUTPUT,
    STATUS,
    client_action,
    kind_of,
    status_verdict,
)
from kallichore_trio.core.state import IDLE_LIKE, SessionState
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
from kallichore_trio.kernel import launch
from kallichore_trio.kernel.connection import (
    PortReservation,
    connection_info,
    new_key,
    reserve_ports,
    uses_handshake,
)
from kallichore_trio.kernel.kernel import Kernel
from kallichore_trio.kernel.params import KernelParams
from kallichore_trio.models import (
    ConnectionInfo,
    NewSession,
    ResourceUsage,
    Status,
    VarAction,
    dump,
)
from kallichore_trio.session import workdir
from kallichore_trio.session.client import ClientChannel, SessionSocket
from kallichore_trio.session.executions import Executions
from kallichore_trio.state import ProcessRef, RecordStore, SessionRecord
from kallichore_trio.transport.websocket import ClientConnection

log = logging.getLogger(__name__)

#: Client messages held while no kernel is connected (delivered to the next one).
HELD_LIMIT = 1000
#: Start attempts, each on freshly picked ports, when the kernel finds a port taken.
PORT_ATTEMPTS = 3
#: Sequence numbers are reserved in the record this many at a time (Session._reserve_seqs).
SEQ_BLOCK = 65_536
#: The reason of a re-attached kernel's guessed `busy`.
REATTACHED_BUSY = "re-attached; the kernel's shell has not answered yet"


class Session:
    """One Kallichore session. It is the `KernelEvents` of its kernels (kernel/kernel.py) and
    the `ClientHost` of its clients (client.py)."""

    def __init__(
        self,
        model: NewSession,
        *,
        config: Config,
        zmq_context: zmq.Context[Any],
        runtime_dir: Path,
        on_activity: Callable[[], None] = lambda: None,
        on_traffic: Callable[[], None] = lambda: None,
        extra_env: Callable[[Session], dict[str, str]] = lambda _: {},
        store: RecordStore | None = None,
        key: str | None = None,
    ) -> None:
        self.model = model
        self.session_id = model.session_id
        self.config = config
        self.runtime_dir = runtime_dir
        self.on_activity = on_activity
        self.on_traffic = on_traffic
        self.key = key or new_key()
        #: Where the session's record is kept for a successor daemon (None: nowhere).
        self.store = store
        #: The connection file of a kernel re-attached from a dead daemon (removed with it).
        self.attached_connection_file: str | None = None
        self._kernel_ref: ProcessRef | None = None
        self.protocol_version = model.protocol_version or "5.3"
        self.created = dt.datetime.now(dt.UTC)
        self.state = SessionState(idle_since=trio.current_time())
        #: Executions followed for the history and for POST /execute (executions.py).
        self.executions = Executions()
        self.queue = ExecutionQueue(on_dropped=self.executions.dropped)
        self.outbox = Outbox(max_frames=config.outbox.max_frames,
                             max_bytes=config.outbox.max_bytes)
        #: Frames up to this number may be sent; the record holds it (`_reserve_seqs`).
        self._seq_reserved = SEQ_BLOCK
        #: The record last written, if any.
        self._record: SessionRecord | None = None
        self.working_directory = model.working_directory
        self.env_actions: list[VarAction] = list(model.env)
        self.initial_env: dict[str, str] = {}
        self.kernel_info: dict[str, Any] = {}
        self.input_prompt = model.input_prompt
        self.continuation_prompt = model.continuation_prompt
        self.connection: ConnectionInfo | None = None
        self.kernel: Kernel | None = None
        self.client: ClientChannel | None = None
        self._socket = SessionSocket(
            self.session_id, config,
            lambda conn, path, resume: self.serve_client(conn, socket_path=path, resume=resume))
        self.resource_usage: ResourceUsage | None = None
        self.restarting = False
        self._adopt_ports: PortReservation | None = None
        self._lifecycle = trio.Lock()
        self._held = HeldMessages(HELD_LIMIT)
        self._nursery: trio.Nursery | None = None
        self.kernel_params = KernelParams(
            session_id=self.session_id,
            username=model.username,
            protocol_version=self.protocol_version,
            key=self.key,
            signer=wire.Signer(self.key.encode()),
            zmq_context=zmq_context,
            timeouts=config.timeouts,
            startup_timeout=(float(model.connection_timeout)
                             if model.connection_timeout and model.connection_timeout > 0
                             else config.timeouts.default_connection),
            startup_environment=model.startup_environment,
            startup_environment_arg=model.startup_environment_arg,
            output_files=store.paths(self.session_id)[1:] if store is not None else None,
        )
        #: Variables added to every kernel's environment (MCP's POSITRON_MCP_URL/TOKEN).
        self.extra_env = extra_env

    def __repr__(self) -> str:
        pid = self.kernel.pid if self.kernel else None
        return (
            f"<Session {self.session_id!r} {self.state.status} pid={pid} "
            f"client_attached={self.client_attached} outbox={len(self.outbox)}>"
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
    def client_attached(self) -> bool:
        """A client is attached (the `connected` of the HTTP model)."""
        return self.client is not None

    @property
    def socket_path(self) -> str | None:
        """The per-session socket the connected client came through, if any."""
        return self.client.socket_path if self.client is not None else None

    @property
    def status(self) -> Status:
        return self.state.status

    # ---- frames to the client ------------------------------------------------------------

    def emit(self, text: str, *, droppable: bool = False, urgent: bool | None = None,
             kept: bool = False) -> None:
        """Queue a frame for the client. Urgent frames (by default all but droppable output)
        are written at once; the others may wait for company (Config.output_linger). Kept
        frames (statuses, replies) are the last the outbox sheds (outbox.py)."""
        if (self.outbox.append(text, droppable=droppable, urgent=urgent, kept=kept)
                > self._seq_reserved):
            self._reserve_seqs()
        client = self.client
        if client is not None:
            client.wake()

    async def wait_for_room(self) -> None:
        """Backpressure: while a client that does not resume is attached and behind by more
        than the high-water mark, wait until it catches up. With no client attached nobody
        drains the outbox, and a resuming client is told what it missed, so the outbox sheds
        droppable output instead (see outbox.py)."""
        while (client := self.client) is not None and client.holds_back:
            await client.wait_caught_up()

    def set_status(self, new: Status, reason: str | None, *, guess: bool = False) -> None:
        if not self.state.set(new, trio.current_time(), guess=guess):
            return
        if new == "exited":
            self.clear_queue()
            self.executions.kernel_exited()
        self.executions.status_changed()
        self.emit(wire.status_event(new, reason), kept=True)
        if new in IDLE_LIKE:
            self.on_activity()

    # ---- callbacks from the kernel (the hot path) ---------------------------------------

    def on_kernel_message(
        self, msg: wire.KernelMessage, channel: str
    ) -> wire.ClientMessage | None:
        """Account for a kernel message and relay it; return a queued request now due. What
        to do is decided by core.relay; this carries it out."""
        kind = kind_of(channel, msg.msg_type)
        due = None
        if kind is STATUS:
            due = self._on_status(msg)
        elif kind is EXECUTE_REPLY:
            due = self.queue.finished(msg.parent_msg_id)
        if self.executions.followed:  # nothing more for a message while nothing is followed
            self.executions.observe(msg)
        # Kept: statuses and everything not on iopub (replies, stdin prompts).
        self.emit(wire.relay_frame(msg, channel), droppable=kind is OUTPUT,
                  kept=kind is STATUS or channel != "iopub")
        if due is not None:
            self.executions.sent(due.msg_id)  # the caller sends it now
        return due

    def _on_status(self, msg: wire.KernelMessage) -> wire.ClientMessage | None:
        reason = msg.parent_msg_type
        verdict = status_verdict(msg.content_json(), reason)
        if verdict.status is None:
            return None
        self.set_status(verdict.status, reason)
        if verdict.checks_cwd:
            self._check_working_directory()
        return self.queue.finished(msg.parent_msg_id) if verdict.ends_request else None

    def _check_working_directory(self) -> None:
        pid = self.kernel.pid if self.kernel else None
        cwd = launch.process_cwd(pid) if pid else None
        if cwd and cwd != self.working_directory:
            self.working_directory = cwd
            self.emit(wire.working_dir_changed_event(cwd))

    def on_output(self, stream: str, text: str) -> None:
        self.emit(wire.output_event(stream, text), droppable=True)

    def on_kernel_exit(self, kernel: Kernel, code: int) -> None:
        if kernel.attached is not None:
            self.forget_connection_file()
        if kernel is not self.kernel or kernel.retrying:
            return  # a stale incarnation, or one about to be replaced on fresh ports
        reason = (
            "child process exited"
            if kernel.process is not None or kernel.attached is not None
            else "all sockets disconnected from an adopted kernel"
        )
        self.set_status("exited", reason)
        self.emit(wire.exited_event(code), kept=True)
        self.persist()

    def on_spawn_failed(self, reason: str) -> None:
        self.set_status("exited", reason)

    def on_heartbeat(self, alive: bool) -> None:
        change = self.state.after_heartbeat(alive)
        if change is not None:
            if not alive:
                log.warning("session %s: lost heartbeat", self.session_id)
            self.set_status(*change)

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
        action = client_action(msg.msg_type, msg.content)
        if action is EXECUTE:
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
        elif action is CLEAR_QUEUE_AND_SEND:
            self.clear_queue()
        await self._send(msg)

    def clear_queue(self) -> None:
        """The one place the execution queue is cleared (the rule is core.relay's): whatever
        ends what the kernel is running drops what waits behind it. That is an interrupt or
        shutdown request (the client's, or ours: `interrupt`, `_stop_kernel`), SIGINT, SIGKILL
        (`kill`) and the kernel's exit (`set_status`)."""
        self.queue.clear()

    async def _send(self, msg: wire.ClientMessage) -> None:
        kernel = self.kernel
        if kernel is None or not kernel.running or self._held:
            dropped = self._held.hold(msg)
            if dropped is not None:
                log.warning("session %s: no kernel to receive %s; dropped the oldest held "
                            "message %s", self.session_id, msg.msg_type, dropped.msg_id)
            return
        await kernel.send(msg)

    async def _flush_held(self, kernel: Kernel) -> None:
        while self._held and kernel.running:
            await kernel.send(self._held.pop())

    # ---- lifecycle operations (HTTP) -----------------------------------------------------

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
        cwd, notice = workdir.start_directory(self.session_id, self.working_directory)
        if notice is not None:
            self.emit(wire.output_event("stderr", notice))
            self.working_directory = cwd
            self.emit(wire.working_dir_changed_event(cwd))
        prepared = launch.prepare(
            self.model, session_id=self.session_id, key=self.key, runtime_dir=self.runtime_dir,
            cwd=cwd, env_actions=self.env_actions, handshake=uses_handshake(self.protocol_version),
            extra_env=self.extra_env(self))
        if prepared.info is not None:
            self.connection = prepared.info
        self.initial_env = prepared.plan.env
        return Kernel(self, self.kernel_params, info=prepared.info, plan=prepared.plan,
                      ports=prepared.ports, retry_on_port_conflict=retry_on_port_conflict)

    async def _run_kernel(self, kernel: Kernel, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            await kernel.run(task_status=task_status)
        except Exception:
            if not kernel.started:
                raise
            # After start nothing may escape into the session nursery: that would end every
            # other task of the session. Log it; the kernel's exit is already reported.
            log.exception("session %s: kernel task failed", self.session_id)

    async def start_kernel_task(self, kernel: Kernel) -> None:
        """Run `kernel` (already `self.kernel`) in the session's nursery until it answered
        kernel_info (durable.reattach; start and adopt do the same inline)."""
        assert self._nursery is not None
        reply: dict[str, Any] = await self._nursery.start(self._run_kernel, kernel)
        self._on_started(reply, parse_prompts=False, shell_free=kernel.shell_answered.is_set())

    @property
    def lifecycle_lock(self) -> trio.Lock:
        return self._lifecycle

    def _on_started(self, reply: dict[str, Any], *, parse_prompts: bool,
                    shell_free: bool = True) -> None:
        self.kernel_info = reply
        self._kernel_ref = None
        if parse_prompts:
            positron = (reply.get("language_info") or {}).get("positron") or {}
            if isinstance(positron.get("input_prompt"), str):
                self.input_prompt = positron["input_prompt"]
            if isinstance(positron.get("continuation_prompt"), str):
                self.continuation_prompt = positron["continuation_prompt"]
        if shell_free:
            self.set_status("idle", "kernel_info_reply")
        else:  # re-attached, and its shell has not answered: it may run a cell (core/state.py)
            self.set_status("busy", REATTACHED_BUSY, guess=True)
        assert self._nursery is not None
        if self.kernel is not None and self._held:
            self._nursery.start_soon(self._flush_held, self.kernel)
        self.persist()

    # ---- the record a successor daemon takes over (state.py, durable.py) ------------------

    def _reserve_seqs(self) -> None:
        """Record the next block of sequence numbers before a frame numbered in it can reach a
        client, so that a successor daemon numbers above them (resume, docs/durability.md).
        Once per SEQ_BLOCK frames; only the reservation changes in the record."""
        self._seq_reserved = self.outbox.last_seq - 1 + SEQ_BLOCK
        if self.store is None:
            return
        if self._record is None:
            self.persist()
        else:
            self._record = attrs.evolve(self._record, seq_reserved=self._seq_reserved)
            self.store.write(self._record)

    def persist(self) -> None:
        """Write the session's record, if it has a store. Not on the message path: called on
        creation, kernel start or restart, and kernel exit."""
        if self.store is None:
            return
        kernel = self.kernel
        process: ProcessRef | None = None
        connection_file = self.attached_connection_file
        if kernel is not None and not kernel.exited.is_set():
            if kernel.attached is not None:
                process = kernel.attached
            elif kernel.pid is not None:
                if self._kernel_ref is None or self._kernel_ref.pid != kernel.pid:
                    self._kernel_ref = ProcessRef.of(kernel.pid)
                process = self._kernel_ref
            if kernel.plan is not None:
                connection_file = str(kernel.plan.connection_file)
        self._record = SessionRecord(
            session=self.model, key=self.key, owner=self.store.owner, created=self.created,
            working_directory=self.working_directory, env=list(self.env_actions),
            connection=self.connection, kernel=process, connection_file=connection_file,
            kernel_info=self.kernel_info, seq_reserved=self._seq_reserved,
        )
        self.store.write(self._record)

    def restore(self, record: SessionRecord) -> None:
        """What a record kept besides the id, model and key (given to the constructor). Its
        frames are numbered above every number the dead daemon may have sent."""
        self._record = record
        self.outbox = Outbox(max_frames=self.config.outbox.max_frames,
                             max_bytes=self.config.outbox.max_bytes,
                             first_seq=record.seq_reserved + 1)
        self._seq_reserved = record.seq_reserved
        self.created = record.created
        self.working_directory = record.working_directory
        self.env_actions = list(record.env)
        self.kernel_info = dict(record.kernel_info)
        self.connection = record.connection
        self.attached_connection_file = record.connection_file

    def forget_connection_file(self) -> None:
        """A re-attached kernel's connection file goes with it (a new kernel writes its own)."""
        path, self.attached_connection_file = self.attached_connection_file, None
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

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
                    await self._stop_kernel(kernel, restart=True)
                await self._start_locked()
        finally:
            self.restarting = False

    def _restart_working_directory(self, requested: str | None) -> None:
        resolved = workdir.restart_directory(self.session_id, requested) if requested else None
        if resolved is not None:
            self.working_directory = resolved
        else:
            self._check_working_directory()

    async def adopt(self, info: ConnectionInfo) -> dict[str, Any]:
        async with self._lifecycle:
            # Signed with the session's own key (the kernel got it from connection_info).
            info = attrs.evolve(info, key=self.key)
            self.connection = info
            kernel = Kernel(self, self.kernel_params, info=info, plan=None, ports=None)
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
            if kernel is None or kernel.pid is None:
                raise SessionInterruptFailed(self.session_id, "No process ID to interrupt")
            pid = kernel.pid
            self.clear_queue()
            if not kernel.signal(signal.SIGINT):
                raise SessionInterruptFailed(self.session_id, f"Process {pid} not found")
            return
        if kernel is None or not kernel.running:
            raise SessionInterruptFailed(self.session_id, "the kernel is not running")
        self.clear_queue()
        await kernel.send_request("control", "interrupt_request", {})

    async def _stop_kernel(self, kernel: Kernel, *, restart: bool) -> None:
        if kernel.running:  # a shutdown_request goes out (Kernel.stop)
            self.clear_queue()
        await kernel.stop(restart=restart, grace=self.config.timeouts.shutdown_request)

    def kill(self) -> None:
        if self.state.status == "exited":
            raise SessionNotRunning(self.session_id)
        kernel = self.kernel
        if kernel is None or kernel.pid is None:
            raise NoProcess(self.session_id)
        self.clear_queue()
        kernel.kill()

    async def shutdown(self) -> None:
        """End the kernel for good: shutdown_request, then SIGTERM, then SIGKILL."""
        kernel = self.kernel
        if kernel is not None and not kernel.exited.is_set():
            await self._stop_kernel(kernel, restart=False)
            with trio.move_on_after(self.config.timeouts.kill):
                await kernel.exited.wait()

    # ---- the client ----------------------------------------------------------------------

    async def channel_socket(self, new_path: Callable[[], Path]) -> Path:
        """The session's Unix socket for clients (socket transport), bound at `new_path()` on
        the first call and kept until the session ends (client.SessionSocket). Raises
        SessionNotFound if the session was deleted meanwhile."""
        return await self._socket.path(new_path, self._live_nursery)

    def _live_nursery(self) -> trio.Nursery:
        if self._nursery is None or self._nursery.cancel_scope.cancel_called:
            raise SessionNotFound(self.session_id)
        return self._nursery

    async def serve_client(self, conn: ClientConnection, *, socket_path: str | None = None,
                           resume: int | None = None) -> None:
        """Run one client until it leaves or a newer client evicts it (ClientChannel.serve).
        `resume`: the last frame a resuming client processed (docs/durability.md)."""
        await ClientChannel(conn, self, config=self.config, socket_path=socket_path,
                            resume=resume).serve()

    # ---- the HTTP view -------------------------------------------------------------------
