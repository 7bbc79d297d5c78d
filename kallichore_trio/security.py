"""Who may talk to the daemon: the bearer token, the Origin allow-list and the Host check.

Pure decisions, no I/O: the HTTP API (a Quart hook that runs before routing, api/__init__.py)
and the per-session Unix sockets (the upgrade in transport/websocket.py) both ask
`check_request` about a request's headers and answer its `Refusal`, if any, themselves.
docs/security.md says what each check protects against.

Header names and values may come as `str` (Quart decodes them as latin-1) or `bytes` (h11);
values are compared as bytes, so a header with characters outside ASCII is simply a mismatch.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from kallichore_trio.config import Config

HeaderPairs = Iterable[tuple[str | bytes, str | bytes]]

#: The only route a client may call without the token: Positron checks `server_id` with it.
UNAUTHENTICATED_PATH = "/status"


@attrs.frozen
class Refusal:
    """Why a request is refused: the HTTP status and a short reason. A 401's body is empty
    (as the reference answers); a 403's body is the reason."""

    status: int
    reason: str


MISSING_OR_WRONG_TOKEN = Refusal(401, "missing or wrong bearer token")


@attrs.frozen(kw_only=True)
class Policy:
    """What `check_request` enforces, fixed at start from the configuration."""

    #: The bearer token; None (`--token none`) turns the token check off, nothing else.
    token: str | None
    #: Exact `Origin` values allowed (`--allow-origin`); requests without an Origin pass.
    allowed_origins: frozenset[str] = frozenset()
    #: The address the TCP listener is bound to, also accepted as Host; None skips the Host
    #: check (Unix sockets: no browser can address them, and clients send arbitrary Hosts).
    bound_host: str | None = None


def policy_for(config: Config, *, tcp: bool) -> Policy:
    """The policy for a listener: `tcp` for the API port, False for any Unix socket."""
    return Policy(
        token=config.token,
        allowed_origins=config.allowed_origins,
        bound_host=config.host if tcp else None,
    )


def session_socket_check(config: Config) -> Callable[[HeaderPairs], Refusal | None]:
    """The check of upgrade requests on per-session Unix sockets (`authorize` in
    transport/websocket.py): the token is always required there, and there is no Host to
    check."""
    policy = policy_for(config, tcp=False)

    def check(headers: HeaderPairs) -> Refusal | None:
        return check_request(policy, headers, token_required=True)

    return check


def _as_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("latin-1")  # how servers decode header bytes into str
    except UnicodeEncodeError:
        return value.encode("utf-8", errors="surrogateescape")


def header(headers: HeaderPairs, name: str) -> bytes | None:
    """The value of header `name` (case-insensitive), or None when absent. Repeated headers
    are joined with ", " as HTTP combines them, so that two Authorization or Origin headers
    match nothing rather than whichever one a parser happens to pick."""
    wanted = name.lower().encode("ascii")
    values = [_as_bytes(v).strip() for k, v in headers if _as_bytes(k).lower() == wanted]
    if not values:
        return None
    return b", ".join(values)


def token_matches(authorization: str | bytes | None, expected: str | None) -> bool:
    """`Authorization: Bearer <token>` (scheme case-insensitive) carries `expected`.

    The comparison takes the same time wherever the first difference is, so that the token
    cannot be guessed a byte at a time by timing. `expected` None means no token is required.
    """
    if expected is None:
        return True
    if authorization is None:
        return False
    scheme, _, token = _as_bytes(authorization).strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), expected.encode("utf-8"))


def origin_allowed(origin: str | bytes | None, allowed: frozenset[str]) -> bool:
    """No Origin (not a browser: Positron's Node client sends none) or one on the allow-list.

    Exact match only: browsers send the origin serialized (`scheme://host[:port]`, lowercase),
    and `--allow-origin` values are checked to have that form.
    """
    if origin is None:
        return True
    try:
        text = _as_bytes(origin).decode("ascii")
    except UnicodeDecodeError:
        return False
    return text in allowed


def _split_host(host: str) -> str | None:
    """The host part of a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), None if it
    is malformed."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[1:end], host[end + 1:]
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            return None
        return name
    name, colon, port = host.partition(":")
    if colon and not _is_port(port):
        return None
    return name


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


def host_allowed(host_header: str | bytes | None, bound_host: str) -> bool:
    """Host names this machine's loopback interface: `localhost`, an address in 127.0.0.0/8,
    `[::1]`, or the address the listener is bound to; any port, or none.

    A page that rebinds its own DNS name to 127.0.0.1 still sends its own name as Host, so
    this refuses it. The port is not checked: a port forward may legitimately change it.
    """
    if host_header is None:
        return False
    try:
        text = _as_bytes(host_header).decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    name = _split_host(text)
    if not name:
        return False
    if name == "localhost" or name == bound_host.lower():
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def requires_token(method: str, path: str) -> bool:
    """Every request needs the token, except reading /status."""
    return not (method in ("GET", "HEAD") and path == UNAUTHENTICATED_PATH)


def check_request(
    policy: Policy, headers: HeaderPairs, *, token_required: bool = True
) -> Refusal | None:
    """None if the request may proceed, else why not.

    The token comes first: a client without it learns nothing else, not even whether the path
    or session it asked for exists. Then the Origin, then (TCP only) the Host.
    """
    pairs = list(headers)
    if token_required and not token_matches(header(pairs, "authorization"), policy.token):
        return MISSING_OR_WRONG_TOKEN
    if not origin_allowed(header(pairs, "origin"), policy.allowed_origins):
        return Refusal(403, "Origin not allowed: requests from web pages are refused "
                            "unless the daemon was started with --allow-origin for them")
    if policy.bound_host is not None and not host_allowed(header(pairs, "host"),
                                                          policy.bound_host):
        return Refusal(403, "Host not allowed: only loopback names (localhost, 127.0.0.0/8, "
                            "[::1]) may be used to reach this server")
    return None


__all__ = [
    "MISSING_OR_WRONG_TOKEN",
    "Policy",
    "Refusal",
    "check_request",
    "header",
    "host_allowed",
    "origin_allowed",
    "policy_for",
    "requires_token",
    "session_socket_check",
    "token_matches",
]
