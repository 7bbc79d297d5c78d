"""The daemon: what the routes may ask besides sessions, and the daemon-wide watchers.

`Daemon` holds shutdown, the client heartbeat and the server configuration; `run_watchers` runs
the tasks that watch the whole daemon:

     ├─ idle-shutdown watchdog (its clock: IdleClock)
     ├─ resource sampler, allocator trimmer (memory.py), busy poller (busypoll.py)
     └─ signal watcher (SIGINT/SIGTERM -> graceful shutdown)

It knows no front end: app.py builds it, the registry and the HTTP app, and runs them.
"""

from __future__ import annotations

import logging
import signal

import psutil
import trio

from kallichore_trio.busypoll import BusyPoll
from kallichore_trio.config import Config
from kallichore_trio.errors import ConfigurationError
from kallichore_trio.kernel.resources import ProcessTreeSampler
from kallichore_trio.mcp.service import McpService
from kallichore_trio.memory import load_malloc_trim, trim_after_bursts
from kallichore_trio.models import ServerConfiguration
from kallichore_trio.registry import SessionRegistry
from kallichore_trio.timers import next_multiple

log = logging.getLogger(__name__)


class IdleClock:
    """When the daemon was last active, for the idle-shutdown watchdog.

    Made before the registry and the Daemon, so both get it at construction: the sessions
    report activity through the registry's `on_activity` callback, the routes through the
    Daemon.
    """

    def __init__(self) -> None:
        self.last_activity = trio.current_time()

    def __repr__(self) -> str:
        return f"<IdleClock last_activity={self.last_activity:.3f}>"

    def on_activity(self) -> None:
        """Something happened that means "not idle": restart the idle clock."""
        self.last_activity = trio.current_time()


class Daemon:
    """What the routes can ask of the daemon besides sessions: shutdown, heartbeats, config."""

    def __init__(
        self, config: Config, registry: SessionRegistry, idle_clock: IdleClock | None = None,
        *, mcp: McpService,
    ) -> None:
        #: The MCP subsystem (docs/mcp.md).
        self.mcp = mcp
        self.config = config
        self.registry = registry
        self.idle_clock = idle_clock if idle_clock is not None else IdleClock()
        self.shutdown_requested = trio.Event()
        self.idle_shutdown_hours = config.idle_shutdown_hours
        self.resource_sample_interval_ms = config.resource_sample_interval_ms
        self.resource_include_children = config.resource_include_children
        self.client_pid: int | None = None
        self._config_changed = trio.Event()
        self._sampler_wake = trio.Event()

    def __repr__(self) -> str:
        return f"<Daemon {self.registry!r} idle_hours={self.idle_shutdown_hours}>"

    def request_shutdown(self, reason: str) -> None:
        if not self.shutdown_requested.is_set():
            log.info("shutting down: %s", reason)
            self.shutdown_requested.set()

    def client_heartbeat(self, process_id: int | None) -> None:
        if process_id is not None and process_id != self.client_pid:
            log.info("tracking client process %d", process_id)
            self.client_pid = process_id
        self.idle_clock.on_activity()

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
        self.idle_clock.on_activity()
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
            deadline = self.idle_clock.last_activity + period
            if trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await self._config_changed.wait()
                continue
            reason = self._busy_reason()
            if reason is not None:
                log.debug("idle timer expired but %s", reason)
                self.idle_clock.on_activity()
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
                if pid is None or not session.client_attached:
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


async def run_watchers(daemon: Daemon, busy_poll: BusyPoll, scope: trio.CancelScope) -> None:
    """The daemon-wide watchers, until `scope` is cancelled."""
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy_poll.run)
            nursery.start_soon(daemon.watch_signals)
            nursery.start_soon(daemon.idle_watchdog)
            nursery.start_soon(daemon.resource_sampler)
            nursery.start_soon(daemon.trim_memory)
