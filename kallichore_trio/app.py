"""The composition root: binds the API listener, builds the parts and runs them.

    run_daemon
     ├─ hypercorn serve (the Quart-Trio app, api/)
     ├─ registry nursery: one task per session (see session/session.py)
     └─ the daemon's watchers (daemon.run_watchers): idle shutdown, resource sampler,
        allocator trimmer, busy poller, signals

This is the one module that knows every layer: the registry gets its callbacks (the idle
clock, the busy poller) when it is made, the Daemon gets the registry, the HTTP app gets the
Daemon; nothing is wired up after construction, and nothing below imports this module.

Shutdown, whatever asked for it: every kernel gets a shutdown_request, then SIGTERM, then
SIGKILL (each bounded), then the HTTP server stops and socket files are removed.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
import zmq
from jupyter_core.paths import jupyter_runtime_dir

from kallichore_trio.api import create_app
from kallichore_trio.busypoll import BusyPoll
from kallichore_trio.config import Config
from kallichore_trio.daemon import Daemon, IdleClock, run_watchers
from kallichore_trio.mcp.service import McpService
from kallichore_trio.registry import SessionRegistry
from kallichore_trio.state import Owner, ProcessRef, RecordStore, prepare_state_dir
from kallichore_trio.transport import hypercorn_ext
from kallichore_trio.transport.unix import bind_unix, main_socket_path

log = logging.getLogger(__name__)


@attrs.frozen
class ServerAddress:
    """Where the API listens, as the connection document reports it (discovery.py)."""

    transport: str
    port: int | None = None
    base_path: str | None = None
    socket_path: str | None = None


def bind_listener(config: Config) -> tuple[socket.socket, ServerAddress, Path | None]:
    """Bind the API socket ourselves, so that a Unix socket is 0600 before anyone can connect.
    Also returns the socket file to remove at the end (None for TCP or a --unix-socket path)."""
    if config.transport == "socket":
        path = config.unix_socket or main_socket_path(config, os.getpid())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock = bind_unix(path)
        # A socket we generated is ours to remove; a user-supplied path is left alone.
        owned = path if config.unix_socket is None else None
        return sock, ServerAddress("socket", socket_path=str(path)), owned
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    return sock, ServerAddress("tcp", port=port, base_path=f"http://{config.host}:{port}"), None


def _record_store(config: Config) -> RecordStore | None:
    """The store of session records in --state-dir (StateDirError if it is unusable)."""
    if config.state_dir is None:
        return None
    prepare_state_dir(config.state_dir)
    me = ProcessRef.of(os.getpid())
    assert me is not None
    return RecordStore(config.state_dir, Owner(process=me, server_id=config.server_id))


def _hypercorn_config(sock: socket.socket) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    # Hypercorn owns (and closes) a duplicate; we close the original.
    hc.bind = [f"fd://{os.dup(sock.fileno())}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Keep-alive pings are ours (session._client_keepalive, through hypercorn_ext), not
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
    store = _record_store(config)
    zmq_context: zmq.Context[Any] = zmq.Context()
    sock, address, owned_socket = bind_listener(config)
    try:
        async with trio.open_nursery() as root:
            stop_http = trio.Event()
            async with trio.open_nursery() as sessions_nursery:
                if busy_poll is None:
                    busy_poll = BusyPoll(config.busy_poll)
                idle_clock = IdleClock()
                mcp: McpService | None = None
                registry = SessionRegistry(
                    config, sessions_nursery, zmq_context, runtime_dir,
                    on_activity=idle_clock.on_activity, on_traffic=busy_poll.on_traffic,
                    # The MCP service needs the registry, and the registry's kernels its
                    # environment (POSITRON_MCP_URL/TOKEN): resolved when a kernel starts.
                    extra_env=lambda session: mcp.kernel_env(session) if mcp else {},
                    store=store)
                # Before serving: the first GET /sessions lists the sessions taken over.
                await registry.reattach_orphans()
                mcp = McpService(config, registry, root, on_activity=idle_clock.on_activity)
                daemon = Daemon(config, registry, idle_clock, mcp=mcp)
                app = create_app(daemon)
                await root.start(
                    partial(hypercorn.trio.serve, app, _hypercorn_config(sock),
                            shutdown_trigger=stop_http.wait)
                )
                watchers = trio.CancelScope()
                root.start_soon(run_watchers, daemon, busy_poll, watchers)
                log.info("listening on %s", address.base_path or address.socket_path)
                task_status.started(address)
                await daemon.shutdown_requested.wait()
                with trio.CancelScope(shield=True):
                    await registry.shutdown_all()  # ends their socket listeners too
                    sessions_nursery.cancel_scope.cancel()
            watchers.cancel()
            mcp.stop()
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
