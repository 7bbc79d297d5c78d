"""Unix-socket listeners and where their files go.

`bind_unix` is the one place a listening Unix socket is made: the daemon's main API socket
(app.py) and each session's channel socket (`serve_unix_socket`) both come from it, so both are
0600 before anyone can connect. The socket-path policy: the generated main socket
`kc-<pid>.sock` (docs/protocol.md §1.2) and the per-session names
`kc-<pid>.<id prefix>.<serial>.sock` (docs/protocol.md §1.3) in --socket-dir, $XDG_RUNTIME_DIR
or the temp dir; and the rule that a listener removes only its own file.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from kallichore_trio.transport.websocket import (
    Authorize,
    CheckTarget,
    ClientGone,
    WsprotoConnection,
    accept_websocket,
)

if TYPE_CHECKING:
    from kallichore_trio.config import Config

log = logging.getLogger(__name__)

#: sockaddr_un.sun_path is 104 bytes on macOS (108 on Linux); Kallichore uses the smaller bound.
MAX_SOCKET_PATH_BYTES = 104


class SocketPathTooLong(ValueError):
    """Even the shortest per-session socket name does not fit in sun_path."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"Socket path {str(path)!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes; "
            "use --socket-dir with a shorter directory"
        )
        self.path = path


#: A file's identity: (st_dev, st_ino).
FileIdentity = tuple[int, int]


def file_identity(path: Path) -> FileIdentity | None:
    """(st_dev, st_ino) of whatever is at path (not following a symlink), None if nothing is."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def remove_stale_socket(path: Path) -> None:
    """Remove a socket (or any non-directory) left at path by an earlier listener."""
    try:
        if not stat.S_ISDIR(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def _remove_own_socket(path: Path, ident: FileIdentity) -> None:
    """Unlink path if it is still the file our listening socket was bound to.

    Called while that socket is still open: a bound socket keeps its file's inode allocated,
    so a file with the same identity can only be ours. Once the socket is closed the inode
    number is free, and the next socket bound at the path can get it back (ext4 does so at
    once), which would make someone else's socket look like ours.
    """
    if file_identity(path) == ident:
        try:
            path.unlink()
        except OSError as exc:
            log.warning("Could not remove socket %s: %s", path, exc)


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at path, mode 0600, replacing a stale socket file left there.

    The mode is set between bind() and listen(): until listen() nobody can connect, so the
    socket is never reachable with the umask's (wider) permissions. Raises OSError (the socket
    closed) if the bind fails.
    """
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_unix_socket(
    path: Path,
    handler: Callable[[WsprotoConnection], Awaitable[None]],
    *,
    authorize: Authorize,
    handshake_timeout: float,
    check_target: CheckTarget | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on a Unix socket at path (mode 0600) and run handler(conn) per WebSocket client
    that `authorize` and `check_target` let in (accept_websocket).

    A failure in one connection is logged and never stops the listener. Cancelling this task
    ends the open connections too (they live in its nursery) and removes the socket file, unless
    something else has replaced it in the meantime.
    """
    sock = bind_unix(path)
    try:
        st = path.lstat()
    except BaseException:
        sock.close()
        raise
    ident = (st.st_dev, st.st_ino)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning or dying.
                    log.warning("Accept failed on %s: %s", path, exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_serve_one, stream, handler, authorize, check_target,
                                   handshake_timeout, path)
    finally:
        # The file goes first, with no checkpoint before it (see _remove_own_socket).
        _remove_own_socket(path, ident)
        await trio.aclose_forcefully(listener)


async def _serve_one(
    stream: trio.SocketStream,
    handler: Callable[[WsprotoConnection], Awaitable[None]],
    authorize: Authorize,
    check_target: CheckTarget | None,
    handshake_timeout: float,
    path: Path,
) -> None:
    conn: WsprotoConnection | None = None
    try:
        conn = await accept_websocket(stream, authorize=authorize, check_target=check_target,
                                      handshake_timeout=handshake_timeout)
        await handler(conn)
    except ClientGone as exc:
        log.debug("Client on %s left: %s", path, exc)
    except Exception:
        log.exception("Error serving a WebSocket client on %s", path)
    finally:
        if conn is not None:
            await conn.close()
        else:
            await trio.aclose_forcefully(stream)


def _name_prefix(session_id: str) -> str:
    """The first 8 bytes of the id, cut back to a character boundary; no path separators."""
    raw = session_id.encode("utf-8", errors="surrogatepass")[:8]
    prefix = raw.decode("utf-8", errors="ignore")
    return prefix.replace("/", "_").replace("\0", "_")


def session_socket_path(socket_dir: Path, session_id: str, pid: int, serial: int) -> Path:
    """A per-session socket path: `kc-<pid>.<first 8 bytes of id>.<serial>.sock`.

    `serial` (one number per listener the daemon ever binds) makes the path unique: ids often
    share their first 8 bytes (`python-<hex>`), and a path shared by two sessions would lead a
    client to the wrong kernel (docs/differences.md, "Transport"). The id prefix is there for
    people reading the directory. A path over 104 bytes falls back to `kc-<pid>.<serial>.sock`;
    if that is still too long, SocketPathTooLong. Kallichore slices 8 bytes and can panic on a
    non-ASCII id; we cut at a character boundary.
    """
    path = socket_dir / f"kc-{pid}.{_name_prefix(session_id)}.{serial}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    path = socket_dir / f"kc-{pid}.{serial}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    raise SocketPathTooLong(path)


def default_socket_dir(config: Config) -> Path:
    """--socket-dir, else $XDG_RUNTIME_DIR, else the temp dir."""
    if config.socket_dir is not None:
        return config.socket_dir
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg)
    return Path(tempfile.gettempdir())


def main_socket_path(config: Config, pid: int) -> Path:
    """The generated main API socket `kc-<pid>.sock` (docs/protocol.md §1.2), when
    --unix-socket is absent.

    An over-long XDG runtime dir falls back to the temp dir, as Kallichore does.
    """
    if config.unix_socket is not None:
        return config.unix_socket
    path = default_socket_dir(config) / f"kc-{pid}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES and config.socket_dir is None:
        path = Path(tempfile.gettempdir()) / f"kc-{pid}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise SocketPathTooLong(path)
    return path
