"""The `kcserver` command line: Kallichore-compatible flags -> Config -> the daemon.

The flags are kcserver's (docs/protocol.md §1.1).

Positron launches kcserver with `--log-level --log-file --connection-file|--handshake-socket
--resource-sample-interval --transport [--idle-shutdown-hours]`; `make run` launches it with
`--transport tcp` alone, and then (only then) the token is printed with a working curl line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shlex
import stat
import sys
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TextIO, cast

import trio

from kallichore_trio.config import KALLICHORE_VERSION, Config, LogLevel, OutboxLimits, Transport
from kallichore_trio.discovery import (
    BoundAddress,
    HandshakeError,
    connection_document,
    send_handshake,
    write_connection_file,
)
from kallichore_trio.flags import boolean, bounded_int, origin, poll_ms, uint16
from kallichore_trio.transport.unix import MAX_SOCKET_PATH_BYTES

log = logging.getLogger("kallichore_trio")

#: Python level for Kallichore's `trace`, below DEBUG.
TRACE = 5
_LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
#: simplelog's spelling of the level names, which Positron users see in the output channel.
_LEVEL_NAMES = {
    TRACE: "TRACE",
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "ERROR",
}
MAX_TOKEN_CHARS = 64

RunDaemon = Callable[..., Awaitable[None]]


class UsageError(Exception):
    """A bad combination of flags: printed as `Error: <msg>`, exit status 1."""


def our_version() -> str:
    try:
        return importlib.metadata.version("kallichore-trio")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kcserver",
        description="Jupyter kernel supervisor (kallichore-trio), a drop-in for Kallichore.",
    )
    add = parser.add_argument
    add("-p", "--port", type=uint16, default=0, metavar="PORT",
        help="TCP port on 127.0.0.1 (default 0: the OS picks one); tcp transport only")
    add("-t", "--token", metavar="PATH|none",
        help="file holding the bearer token (read, then deleted); 'none' disables auth; "
             "default: a random token")
    add("-i", "--idle-shutdown-hours", type=uint16, metavar="N",
        help="exit after N hours with no activity (0 = about 30 seconds); default: never")
    add("-r", "--resource-sample-interval", type=uint16, default=1000, metavar="MS",
        help="kernel resource usage sampling interval in ms (0 = off; default 1000)")
    add("--resource-include-children", type=boolean, default=True, metavar="true|false",
        help="include the kernel's child processes in resource samples (default true)")
    add("-l", "--log-level", metavar="LEVEL",
        help="trace, debug, info, warn or error (default: $RUST_LOG, else info)")
    add("--log-file", type=Path, metavar="PATH",
        help="also log to this file (truncated at start)")
    add("--connection-file", type=Path, metavar="PATH",
        help="write the connection details (JSON, 0600) here; implies --transport socket")
    add("--handshake-socket", type=Path, metavar="PATH",
        help="send the connection details to the client listening on this Unix socket; "
             "implies --transport socket")
    add("--socket-dir", type=Path, metavar="DIR",
        help="directory for generated Unix sockets (default: $XDG_RUNTIME_DIR, else tmp)")
    add("--state-dir", type=Path, metavar="DIR",
        help="where session records and kernel output are kept so that kernels survive a "
             "daemon crash and the next daemon re-attaches them (default: "
             "the per-user state directory, e.g. ~/.local/state/kallichore-trio)")
    add("--unix-socket", type=Path, metavar="PATH",
        help=f"serve the API on this Unix socket (at most {MAX_SOCKET_PATH_BYTES} bytes); "
             "implies --transport socket")
    add("--transport", metavar="tcp|socket",
        help="API transport (default: socket with --connection-file, --handshake-socket or "
             "--unix-socket, else tcp)")
    add("--allow-origin", action="append", type=origin, default=[], metavar="ORIGIN",
        help="let web pages from ORIGIN (scheme://host[:port]) call the API and open channels; "
             "repeatable. Default: none, every request carrying an Origin header is refused")
    add("--busy-poll", type=poll_ms, metavar="MS",
        help="keep polling for MS ms after each relayed message instead of letting the CPU "
             "idle: a little lower latency for up to a core of CPU while traffic flows "
             "(default 0 = off)")
    add("--outbox-frames", type=bounded_int(100, 10_000_000), metavar="N",
        help="frames each session keeps for its client while it is away or behind (default "
             f"{OutboxLimits().max_frames:,}); statuses and replies may take up to 4x")
    add("--outbox-mib", type=bounded_int(1, 65_536), metavar="MIB",
        help="the same bound in MiB of frame text (default "
             f"{OutboxLimits().max_bytes >> 20}); see docs/durability.md")
    add("-V", "--version", action="version",
        version=f"kcserver {KALLICHORE_VERSION} (kallichore-trio {our_version()})",
        help="print the version and exit")
    return parser


def infer_transport(ns: argparse.Namespace) -> Transport:
    """Explicit --transport, else --unix-socket, --connection-file or --handshake-socket ⇒
    socket, else tcp (docs/protocol.md §1.1)."""
    if ns.transport is not None:
        if ns.transport in ("tcp", "socket"):
            return cast(Transport, ns.transport)
        if ns.transport == "named-pipe":
            raise UsageError("the named-pipe transport is only available on Windows; "
                             "use tcp or socket")
        raise UsageError(f"invalid transport '{ns.transport}'; expected tcp, socket or "
                         "named-pipe")
    if ns.unix_socket is not None or ns.connection_file is not None:
        return "socket"
    if ns.handshake_socket is not None:
        return "socket"
    return "tcp"


def parse_log_level(value: str | None, err: TextIO) -> LogLevel:
    if value is None:
        return "info"
    level = value.strip().lower()
    if level in _LEVELS:
        return cast(LogLevel, level)
    print(f"Invalid log level '{value}'; using 'info'", file=err)
    return "info"


def read_token_file(path: Path, warnings: list[str]) -> str:
    """Read, trim and validate the token, then delete the file so the token leaves the disk."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"could not read the token file '{path}': {exc}") from exc
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            warnings.append(f"Could not delete the token file '{path}': {exc}")
    if not token:
        raise UsageError(f"the token file '{path}' is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise UsageError(f"the token in '{path}' is longer than {MAX_TOKEN_CHARS} characters")
    if not all("!" <= c <= "~" for c in token):
        # It goes verbatim into an Authorization header.
        raise UsageError(f"the token in '{path}' must be printable ASCII without spaces")
    return token


def config_from_args(
    ns: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    err: TextIO | None = None,
    warnings: list[str] | None = None,
) -> Config:
    """Validate the flags and build the Config; raises UsageError. Reads (and deletes) the
    token file. Messages meant for the log once it exists are appended to warnings."""
    err = err if err is not None else sys.stderr
    warnings = warnings if warnings is not None else []
    transport = infer_transport(ns)
    if ns.port != 0 and transport != "tcp":
        raise UsageError(f"--port can only be used with the tcp transport (it is {transport})")
    if ns.unix_socket is not None:
        if transport != "socket":
            raise UsageError("--unix-socket requires the socket transport")
        length = len(os.fsencode(ns.unix_socket))
        if length > MAX_SOCKET_PATH_BYTES:
            raise UsageError(f"the Unix socket path '{ns.unix_socket}' is {length} bytes; "
                             f"the limit is {MAX_SOCKET_PATH_BYTES}")
    level = parse_log_level(ns.log_level if ns.log_level is not None
                            else environ.get("RUST_LOG"), err)
    kwargs: dict[str, Any] = {}
    if ns.busy_poll is not None:
        kwargs["busy_poll"] = ns.busy_poll / 1000
    if ns.outbox_frames is not None or ns.outbox_mib is not None:
        default = OutboxLimits()
        kwargs["outbox"] = OutboxLimits(
            max_frames=ns.outbox_frames if ns.outbox_frames is not None else default.max_frames,
            max_bytes=ns.outbox_mib << 20 if ns.outbox_mib is not None else default.max_bytes)
    if ns.token == "none":
        kwargs["token"] = None
    elif ns.token is not None:
        kwargs["token"] = read_token_file(Path(ns.token), warnings)
    return Config(
        transport=transport,
        port=ns.port,
        unix_socket=_absolute(ns.unix_socket),
        socket_dir=_absolute(ns.socket_dir),
        connection_file=_absolute(ns.connection_file),
        handshake_socket=_absolute(ns.handshake_socket),
        idle_shutdown_hours=ns.idle_shutdown_hours,
        resource_sample_interval_ms=ns.resource_sample_interval,
        resource_include_children=ns.resource_include_children,
        log_level=level,
        log_file=_absolute(ns.log_file),
        allowed_origins=frozenset(ns.allow_origin),
        state_dir=_absolute(ns.state_dir) or default_state_dir(),
        **kwargs,
    )


def _absolute(path: Path | None) -> Path | None:
    # Absolute, so documents and later chdirs cannot change what the path means.
    return None if path is None else path.absolute()


def default_state_dir() -> Path:
    from platformdirs import user_state_dir

    return Path(user_state_dir("kallichore-trio"))


def prepare_paths(config: Config) -> None:
    """Create the directories the sockets go in (Kallichore creates the parents too)."""
    dirs = [d for d in (config.socket_dir,) if d is not None]
    if config.unix_socket is not None:
        dirs.append(config.unix_socket.parent)
    for directory in dirs:
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"could not create the directory '{directory}': {exc}") from exc
    if config.state_dir is not None:
        from kallichore_trio.state import StateDirError, prepare_state_dir

        try:
            prepare_state_dir(config.state_dir)
        except StateDirError as exc:
            raise UsageError(str(exc)) from exc


class _Formatter(logging.Formatter):
    """`HH:MM:SS [LEVEL] message`, as Kallichore's simplelog writes it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s [%(kc_level)s] %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.kc_level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        return super().format(record)


def setup_logging(level: LogLevel, log_file: Path | None) -> list[logging.Handler]:
    """Terminal logging (stdout; errors to stderr) and the optional --log-file, same level.

    Returns the handlers installed, for teardown_logging.
    """
    logging.addLevelName(TRACE, "TRACE")
    formatter = _Formatter()
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.ERROR)
    errs = logging.StreamHandler(sys.stderr)
    errs.setLevel(logging.ERROR)
    handlers: list[logging.Handler] = [out, errs]
    if log_file is not None:
        try:
            _create_private(log_file)
            handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"could not open the log file '{log_file}': {exc}") from exc
    root = logging.getLogger()
    root.setLevel(_LEVELS[level])
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    return handlers


def _create_private(path: Path) -> None:
    """Create (or truncate) path readable by its owner only: the log names sessions, kernel
    command lines and working directories. A path that is not a regular file (/dev/stderr)
    keeps its mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def teardown_logging(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


def curl_example(address: BoundAddress, token: str | None) -> str:
    auth = f"-H {shlex.quote(f'Authorization: Bearer {token}')} " if token else ""
    if address.transport == "socket":
        sock = shlex.quote(str(address.socket_path))
        return f"curl --unix-socket {sock} {auth}http://localhost/sessions"
    return f"curl {auth}{address.base_path}/sessions"


def listening_line(address: BoundAddress) -> str:
    if address.transport == "socket":
        return f"Listening on Unix socket: {address.socket_path}"
    return f"Listening at 127.0.0.1:{address.port}"


async def announce(config: Config, address: BoundAddress, out: TextIO) -> None:
    """Tell the client where we are: connection file and/or handshake, then stdout.

    The token goes to stdout only when no client receives it in a document (the `make run`
    case); it is never logged.
    """
    doc = connection_document(config, address)
    if config.connection_file is not None:
        write_connection_file(config.connection_file, doc)
        log.info("Wrote the connection file %s", config.connection_file)
    if config.handshake_socket is not None:
        await send_handshake(config.handshake_socket, doc, config.timeouts.handshake)
        log.info("Sent the connection details to %s", config.handshake_socket)
    print(listening_line(address), file=out, flush=True)
    if config.connection_file is None and config.handshake_socket is None:
        where = address.base_path if address.transport == "tcp" else address.socket_path
        print(f"Base URL: {where}", file=out)
        print(f"Token: {config.token if config.token is not None else '(none: auth disabled)'}",
              file=out)
        print(f"Try: {curl_example(address, config.token)}", file=out, flush=True)


async def serve(config: Config, run_daemon: RunDaemon, out: TextIO | None = None, *,
                default_connection_file: Path | None = None) -> int:
    """Run the daemon until it shuts down; returns the process exit status.

    `default_connection_file`: where to also write the connection document when no client
    asked for one (`kc` and the Python client look there; docs/client.md). Removed at exit.
    """
    out = out if out is not None else sys.stdout
    try:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(run_daemon, config)
            try:
                await announce(config, address, out)
            except (HandshakeError, OSError) as exc:
                # Nobody can reach a server whose address was not delivered: stop it.
                log.error("Could not deliver the connection details: %s", exc)
                nursery.cancel_scope.cancel()
                return 1
            if default_connection_file is not None:
                _write_default_connection_file(config, address, default_connection_file, out)
    finally:
        if default_connection_file is not None:
            _remove_default_connection_file(config, default_connection_file)
    return 0


def default_connection_file_path() -> Path:
    """`<jupyter runtime dir>/kcserver-<pid>.json` (kallichore_trio.client.discovery)."""
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / f"kcserver-{os.getpid()}.json"


def _write_default_connection_file(config: Config, address: BoundAddress, path: Path,
                                   out: TextIO) -> None:
    # Best effort: the daemon serves without it (the address and token are on stdout).
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_connection_file(path, connection_document(config, address))
    except OSError as exc:
        log.warning("Could not write the connection file %s: %s", path, exc)
        return
    print(f"Connection file: {path} (kc and kallichore_trio.client find it)", file=out,
          flush=True)


def _remove_default_connection_file(config: Config, path: Path) -> None:
    # Only if it is still ours (same server_id).
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and doc.get("server_id") == config.server_id:
            path.unlink()
    except (OSError, ValueError):
        pass


def _load_daemon() -> RunDaemon:
    # Imported late so that --help, --version and flag errors need nothing beyond this module.
    from kallichore_trio.app import run_daemon

    return run_daemon


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["mcp-stdio"]:  # the MCP stdio relay (docs/mcp.md)
        from kallichore_trio.mcp.stdio import main as mcp_stdio
        return mcp_stdio(args[1:])
    ns = build_parser().parse_args(argv)
    warnings: list[str] = []
    try:
        config = config_from_args(ns, os.environ, warnings=warnings)
        prepare_paths(config)
        handlers = setup_logging(config.log_level, config.log_file)
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    try:
        for message in warnings:
            log.warning("%s", message)
        if config.token is None:
            log.warning("Authentication is disabled (--token none): any local process can "
                        "start and control kernels")
        log.info("kallichore-trio %s (kcserver %s compatible)", our_version(),
                 KALLICHORE_VERSION)
        if config.busy_poll:
            log.info("polling for %g ms after each relayed message (--busy-poll 0 turns it off)",
                     config.busy_poll * 1e3)
        else:
            log.info("no polling after relayed messages (--busy-poll)")
        default_file = (default_connection_file_path()
                        if config.connection_file is None and config.handshake_socket is None
                        else None)
        return trio.run(partial(serve, default_connection_file=default_file), config,
                        _load_daemon())
    except KeyboardInterrupt:
        # A signal before the daemon installed its handlers.
        return 130
    except Exception:
        log.exception("kcserver failed")
        return 1
    finally:
        teardown_logging(handlers)
