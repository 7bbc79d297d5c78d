"""The daemon: the root nursery that owns the HTTP server, the sessions and the watchdogs.

    run_daemon
     ├─ hypercorn serve (the Quart-Trio app)
     ├─ registry nursery: one task per session (see session/session.py)
     ├─ idle-shutdown watchdog
     ├─ resource sampler, allocator trimmer (memory.py)
     └─ signal watcher (SIGINT/SIGTERM -> graceful shutdown)

Shutdown, whatever asked for it: every kernel gets a shutdown_request, then SIGTERM, then
SIGKILL (each bounded), then the HTTP server stops and socket files are removed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import psutil
import trio
import zmq
from jupyter_core.paths import jupyter_runtime_dir

from kallichore_trio.api import create_app, hypercorn_ext
from kallichore_trio.busypoll import BusyPoll
from kallichore_trio.config import Config
from kallichore_trio.errors import ConfigurationError
from kallichore_trio.mcp.service import McpService
from kallichore_trio.memory import load_malloc_trim, trim_after_bursts
from kallichore_trio.models import ServerConfiguration
from kallichore_trio.registry import SessionRegistry
from kallichore_trio.session.resources import ProcessTreeSampler
from kallichore_trio.timers import next_multiple
from kallichore_trio.wsconn import main_socket_path, remove_stale_socket

log = logging.getLogger(__name__)


@attrs.frozen
class ServerAddress:
    transport: str
    port: int | None = None
    base_path: str | None = None
    socket_path: str | None = None


class Daemon:
    """What the routes can ask of the daemon besides sessions: shutdown, heartbeats, config."""

    #: The MCP subsystem (docs/mcp.md), set by run_daemon.
    mcp: McpService

    def __init__(self, config: Config, registry: SessionRegistry) -> None:
        self.config = config
        self.registry = registry
        self.shutdown_requested = trio.Event()
        self.shutdown_reason = ""
        self.idle_shutdown_hours = config.idle_shutdown_hours
        self.resource_sample_interval_ms = config.resource_sample_interval_ms
        self.resource_include_children = config.resource_include_children
        self.client_pid: int | None = None
        self._last_activity = trio.current_time()
        self._config_changed = trio.Event()
        self._sampler_wake = trio.Event()

    def __repr__(self) -> str:
        return f"<Daemon {self.registry!r} idle_hours={self.idle_shutdown_hours}>"

    def request_shutdown(self, reason: str) -> None:
        if not self.shutdown_requested.is_set():
            log.info("shutting down: %s", reason)
            self.shutdown_reason = reason
            self.shutdown_requested.set()

    def nudge(self) -> None:
        """Something happened that means "not idle": restart the idle clock."""
        self._last_activity = trio.current_time()

    def client_heartbeat(self, process_id: int | None) -> None:
        if process_id is not None and process_id != self.client_pid:
            log.info("tracking client process %d", process_id)
            self.client_pid = process_id
        self.nudge()

    def server_configuration(self) -> ServerConfiguration:
        hours = self.idle_shutdown_hours
        return ServerConfiguration(
            idle_shutdown_hours=hours,
            resource_sample_interval_ms=self.resource_sample_interval_ms,
            log_level=self.config.log_level,
            resource_include_children=self.resource_include_children,
        )

    def configure(self, update: ServerConfiguration) -> None:
        hours, interval = update.idle_shutdown_hours, update.resource_sample_interval_ms
        if hours is not None and hours > 65535:
            raise ConfigurationError("idle_shutdown_hours is too large")
        if interval is not None and interval < 0:
            raise ConfigurationError("resource_sample_interval_ms must be non-negative")
        if hours is not None:
            self.idle_shutdown_hours = None if hours < 0 else hours
            log.info("idle shutdown: %s", "disabled" if hours < 0 else f"{hours} h")
        if interval is not None:
            self.resource_sample_interval_ms = 0 if interval == 0 else max(interval, 100)
            self._sampler_wake.set()
        children = update.resource_include_children
        if children is not None and children != self.resource_include_children:
            self.resource_include_children = children
            log.info("resource samples: %s", "process tree" if children else "kernel only")
        self.nudge()
        self._config_changed.set()

    # ---- idle shutdown -------------------------------------------------------------------

    def _idle_period(self) -> float | None:
        hours = self.idle_shutdown_hours
        if hours is None:
            return None
        return self.config.timeouts.idle_zero_hours if hours == 0 else hours * 3600.0

    def _busy_reason(self) -> str | None:
        if self.client_pid is not None and self.client_pid > 1:
            if psutil.pid_exists(self.client_pid):
                return f"client process {self.client_pid} is alive"
            log.info("client process %d is gone", self.client_pid)
            self.client_pid = None
        if self.registry.any_busy:
            return "a session is busy"
        if self.registry.any_connected:
            return "a client is connected"
        return None

    async def idle_watchdog(self) -> None:
        """Shut down after a whole idle period. trio's clock is CLOCK_MONOTONIC, which stops
        while the machine sleeps, so time asleep does not count as idle time."""
        while True:
            self._config_changed = trio.Event()
            period = self._idle_period()
            if period is None:
                await self._config_changed.wait()
                continue
            deadline = self._last_activity + period
            if trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await self._config_changed.wait()
                continue
            reason = self._busy_reason()
            if reason is not None:
                log.debug("idle timer expired but %s", reason)
                self.nudge()
                continue
            self.request_shutdown(f"idle for {period:.0f} s")
            return

    async def resource_sampler(self) -> None:
        """Every interval, sample the kernels that have a client attached (nobody else sees
        the figures, so sampling costs nothing while no client is connected)."""
        samplers: dict[int, ProcessTreeSampler] = {}
        while True:
            self._sampler_wake = trio.Event()
            interval = self.resource_sample_interval_ms
            if interval <= 0:
                samplers.clear()
                await self._sampler_wake.wait()
                continue
            with trio.move_on_at(next_multiple(interval / 1000)):
                await self._sampler_wake.wait()
            live: set[int] = set()
            children = self.resource_include_children
            for session in list(self.registry.sessions.values()):
                pid = session.kernel.pid if session.kernel else None
                if pid is None or not session.connected:
                    continue
                live.add(pid)
                sampler = samplers.get(pid)
                if sampler is None or sampler.include_children != children:
                    sampler = samplers[pid] = ProcessTreeSampler(pid, include_children=children)
                usage = sampler.sample(interval)
                if usage is not None:
                    session.on_resource_usage(usage)
            for pid in set(samplers) - live:
                del samplers[pid]

    async def trim_memory(self) -> None:
        settings = self.config.allocator_trim
        await trim_after_bursts(self._frames_produced, check_every=settings.check_every,
                                burst_frames=settings.burst_frames, trim=load_malloc_trim())

    def _frames_produced(self) -> dict[str, int]:
        return {key: session.outbox.produced for key, session in self.registry.sessions.items()}

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.request_shutdown(f"received {signal.Signals(signum).name}")


async def _run_watchers(daemon: Daemon, busy_poll: BusyPoll, scope: trio.CancelScope) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy_poll.run)
            nursery.start_soon(daemon.watch_signals)
            nursery.start_soon(daemon.idle_watchdog)
            nursery.start_soon(daemon.resource_sampler)
            nursery.start_soon(daemon.trim_memory)


def _bind_socket(config: Config) -> tuple[socket.socket, ServerAddress, Path | None]:
    """Bind the API socket ourselves so that its mode is 0600 before anyone can connect."""
    if config.transport == "socket":
        path = config.unix_socket or main_socket_path(config, os.getpid())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
        # A socket we generated is ours to remove; a user-supplied path is left alone.
        owned = path if config.unix_socket is None else None
        return sock, ServerAddress("socket", socket_path=str(path)), owned
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    return sock, ServerAddress("tcp", port=port, base_path=f"http://{config.host}:{port}"), None


def _hypercorn_config(sock: socket.socket) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    # Hypercorn owns (and closes) a duplicate; we close the original.
    hc.bind = [f"fd://{os.dup(sock.fileno())}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Keep-alive pings are ours (session._client_keepalive, through api.hypercorn_ext), not
    # Hypercorn's, which never learns whether they were answered.
    hypercorn_ext.install()
    hc.websocket_ping_interval = None
    hc.websocket_max_message_size = 256 * 1024 * 1024
    hc.graceful_timeout = 2.0
    hc.keep_alive_timeout = 75.0
    return hc


async def run_daemon(
    config: Config,
    *,
    busy_poll: BusyPoll | None = None,
    task_status: trio.TaskStatus[ServerAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until shut down. `busy_poll` is made from the config unless given (a test gives
    its own to watch it)."""
    runtime_dir = config.runtime_dir or Path(jupyter_runtime_dir())
    zmq_context: zmq.Context[Any] = zmq.Context()
    sock, address, owned_socket = _bind_socket(config)
    try:
        async with trio.open_nursery() as root:
            stop_http = trio.Event()
            async with trio.open_nursery() as sessions_nursery:
                if busy_poll is None:
                    busy_poll = BusyPoll(config.busy_poll)
                registry = SessionRegistry(config, sessions_nursery, zmq_context, runtime_dir,
                                           on_traffic=busy_poll.touch)
                daemon = Daemon(config, registry)
                registry.on_activity = daemon.nudge
                daemon.mcp = McpService(config, registry, root, on_activity=daemon.nudge)
                registry.extra_env = daemon.mcp.kernel_env
                app = create_app(daemon)
                await root.start(
                    partial(hypercorn.trio.serve, app, _hypercorn_config(sock),
                            shutdown_trigger=stop_http.wait)
                )
                watchers = trio.CancelScope()
                root.start_soon(_run_watchers, daemon, busy_poll, watchers)
                log.info("listening on %s", address.base_path or address.socket_path)
                task_status.started(address)
                await daemon.shutdown_requested.wait()
                with trio.CancelScope(shield=True):
                    await registry.shutdown_all()  # ends their socket listeners too
                    sessions_nursery.cancel_scope.cancel()
            watchers.cancel()
            daemon.mcp.stop()
            # Let the HTTP response to POST /shutdown go out, then stop serving.
            await trio.sleep(0.05)
            stop_http.set()
            root.cancel_scope.deadline = trio.current_time() + 5.0
    finally:
        sock.close()
        if owned_socket is not None:
            try:
                owned_socket.unlink()
            except OSError:
                pass
        zmq_context.term()
        log.info("stopped")
