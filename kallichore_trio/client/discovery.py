"""Where the daemon is and how to authenticate: a `ServerAddress`.

Found, in this order, from an explicit connection file, `$KALLICHORE_CONNECTION_FILE`, or the
newest live default connection file `kcserver` writes in the Jupyter runtime dir when it is not
asked for one (`kcserver-<pid>.json`, see kallichore_trio/cli.py). A connection file is the
server connection document of docs/protocol.md §1.4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
import psutil

from kallichore_trio.client.errors import DaemonNotFound

ENV_VAR = "KALLICHORE_CONNECTION_FILE"
#: Default connection files: `<jupyter runtime dir>/kcserver-<pid>.json`.
DEFAULT_PREFIX = "kcserver-"


@attrs.frozen
class ServerAddress:
    """How to reach one daemon. `uds` is the API's Unix socket (socket transport), else None
    and `base_url` is `http://127.0.0.1:<port>`."""

    base_url: str
    token: str | None = attrs.field(default=None, repr=False)
    uds: str | None = None
    connection_file: Path | None = None
    server_pid: int | None = None

    @property
    def transport(self) -> str:
        return "tcp" if self.uds is None else "socket"

    def describe(self) -> str:
        return self.uds if self.uds is not None else self.base_url


def from_document(doc: Any, *, source: str = "connection document",
                  path: Path | None = None) -> ServerAddress:
    """A ServerAddress from a parsed connection document."""
    if not isinstance(doc, dict):
        raise DaemonNotFound(f"{source} is not a JSON object")
    token = doc.get("bearer_token")
    pid = doc.get("server_pid") if isinstance(doc.get("server_pid"), int) else None
    if isinstance(doc.get("socket_path"), str):
        return ServerAddress("http://localhost", token, doc["socket_path"], path, pid)
    if isinstance(doc.get("base_path"), str):
        return ServerAddress(doc["base_path"].rstrip("/"), token, None, path, pid)
    if isinstance(doc.get("port"), int):
        return ServerAddress(f"http://127.0.0.1:{doc['port']}", token, None, path, pid)
    raise DaemonNotFound(f"{source} has neither socket_path nor base_path/port")


def from_connection_file(path: str | os.PathLike[str]) -> ServerAddress:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DaemonNotFound(f"no connection file at {path}; is kcserver running?") from None
    except (OSError, ValueError) as exc:
        raise DaemonNotFound(f"cannot read the connection file {path}: {exc}") from None
    return from_document(doc, source=f"the connection file {path}", path=path)


def runtime_dir() -> Path:
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir())


def default_connection_file(pid: int | None = None) -> Path:
    """Where `kcserver` writes its connection file when not given one."""
    return runtime_dir() / f"{DEFAULT_PREFIX}{os.getpid() if pid is None else pid}.json"


def live_default_files() -> list[Path]:
    """Default connection files whose daemon still runs, newest first."""
    directory = runtime_dir()
    found = []
    for path in directory.glob(f"{DEFAULT_PREFIX}*.json"):
        pid_text = path.stem[len(DEFAULT_PREFIX):]
        if pid_text.isdigit() and psutil.pid_exists(int(pid_text)):
            try:
                found.append((path.stat().st_mtime, path))
            except OSError:
                continue
    return [p for _, p in sorted(found, reverse=True)]


def find_server(connection_file: str | os.PathLike[str] | None = None,
                url: str | None = None, token: str | None = None) -> ServerAddress:
    """The daemon to use: explicit arguments, else $KALLICHORE_CONNECTION_FILE, else the
    newest running kcserver's default connection file."""
    if url is not None:
        if url.startswith("unix:"):
            return ServerAddress("http://localhost", token, url[len("unix:"):])
        return ServerAddress(url.rstrip("/"), token)
    if connection_file is None:
        connection_file = os.environ.get(ENV_VAR) or None
    if connection_file is not None:
        address = from_connection_file(connection_file)
    else:
        files = live_default_files()
        if not files:
            raise DaemonNotFound(
                f"no running kcserver found (no live {DEFAULT_PREFIX}<pid>.json in "
                f"{runtime_dir()}); start one with `make run`, or pass --connection-file, "
                f"${ENV_VAR} or --url/--token")
        address = from_connection_file(files[0])
    if token is not None:
        address = attrs.evolve(address, token=token)
    return address
