"""Where the MCP listener listens, and what the URLs on it name. No SDK here.

The service needs these without the SDK: it builds the URLs it hands out (the registration's
answer, the kernels' POSITRON_MCP_URL) and binds the port before the SDK-backed listener exists;
the listener's gate parses them.
"""

from __future__ import annotations

import socket

import attrs

LOOPBACK = "127.0.0.1"


class ListenerFailed(Exception):
    """The listener could not bind its port."""


@attrs.frozen
class Route:
    """What a listener URL names: a workspace, optionally one session, or a server card."""

    workspace_id: str
    session_id: str | None = None
    card: bool = False


def parse_route(path: str) -> Route | None:
    """`/mcp/w/<workspace>`, `/mcp/w/<workspace>/s/<session>`, each optionally followed by
    `/server-card` (or a trailing slash); None for anything else."""
    parts = path.rstrip("/").split("/")
    if len(parts) < 4 or parts[:3] != ["", "mcp", "w"] or not parts[3]:
        return None
    workspace_id, rest = parts[3], parts[4:]
    card = bool(rest) and rest[-1] == "server-card"
    if card:
        rest = rest[:-1]
    if not rest:
        return Route(workspace_id, None, card)
    if len(rest) == 2 and rest[0] == "s" and rest[1]:
        return Route(workspace_id, rest[1], card)
    return None


def route_url(port: int, route: Route) -> str:
    url = f"http://{LOOPBACK}:{port}/mcp/w/{route.workspace_id}"
    return url if route.session_id is None else f"{url}/s/{route.session_id}"


def bind_loopback(preferred_port: int | None) -> socket.socket:
    """A listening socket on 127.0.0.1: `preferred_port` if it is free, else any port."""
    errors = []
    for port in ([preferred_port] if preferred_port else []) + [0]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            errors.append(f"port {port}: {exc}")
            continue
        return sock
    raise ListenerFailed("could not listen on 127.0.0.1 (" + "; ".join(errors) + ")")


__all__ = ["LOOPBACK", "ListenerFailed", "Route", "bind_loopback", "parse_route", "route_url"]
