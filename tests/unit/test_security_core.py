"""The pure access checks (security.py): token, Origin, Host, and the order they are applied."""

from __future__ import annotations

import pytest

from kallichore_trio.config import Config
from kallichore_trio.security import (
    MISSING_OR_WRONG_TOKEN,
    Policy,
    check_request,
    header,
    host_allowed,
    origin_allowed,
    policy_for,
    requires_token,
    session_socket_check,
    token_matches,
)

TOKEN = "0123456789abcdef"


@pytest.mark.parametrize(
    ("authorization", "expected", "matches"),
    [
        (f"Bearer {TOKEN}", TOKEN, True),
        (f"bearer {TOKEN}", TOKEN, True),  # the scheme is case-insensitive
        (f"BEARER   {TOKEN}  ", TOKEN, True),
        (f"Bearer {TOKEN}".encode(), TOKEN, True),
        (None, TOKEN, False),
        ("", TOKEN, False),
        ("Bearer", TOKEN, False),
        ("Bearer ", TOKEN, False),
        (f"Basic {TOKEN}", TOKEN, False),
        (TOKEN, TOKEN, False),  # no scheme
        (f"Bearer {TOKEN.upper()}", TOKEN, False),  # the token itself is case-sensitive
        (f"Bearer {TOKEN}x", TOKEN, False),
        (f"Bearer {TOKEN[:-1]}", TOKEN, False),
        (f"Bearer {TOKEN}, Bearer {TOKEN}", TOKEN, False),  # two headers, joined
        ("Bearer ünïcödé", TOKEN, False),  # a non-ASCII str does not raise
        ("Bearer \udcff", TOKEN, False),  # nor an unencodable one
        (b"Bearer \xff\xfe", TOKEN, False),  # nor raw bytes
        (None, None, True),  # --token none
        ("Bearer anything", None, True),
    ],
)
def test_token_matches(authorization: str | bytes | None, expected: str | None,
                       matches: bool) -> None:
    assert token_matches(authorization, expected) is matches


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, frozenset(), True),  # not a browser
        ("http://evil.example", frozenset(), False),
        ("null", frozenset(), False),
        ("http://localhost:3000", frozenset(), False),  # loopback pages are pages too
        ("http://localhost:3000", frozenset({"http://localhost:3000"}), True),
        ("http://localhost:3001", frozenset({"http://localhost:3000"}), False),
        ("https://localhost:3000", frozenset({"http://localhost:3000"}), False),
        (b"vscode-webview://abc", frozenset({"vscode-webview://abc"}), True),
        (b"http://\xff", frozenset({"http://\xff"}), False),
        ("http://a, http://b", frozenset({"http://a", "http://b"}), False),  # two headers
    ],
)
def test_origin_allowed(origin: str | bytes | None, allowed: frozenset[str], ok: bool) -> None:
    assert origin_allowed(origin, allowed) is ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("localhost", True),
        ("localhost:40123", True),
        ("LOCALHOST:40123", True),
        ("127.0.0.1", True),
        ("127.0.0.1:40123", True),
        ("127.0.0.5", True),
        ("127.255.255.254:1", True),
        ("[::1]", True),
        ("[::1]:40123", True),
        ("[0:0:0:0:0:0:0:1]:80", True),
        ("10.1.2.3", True),  # the bound address (see bound_host below)
        ("10.1.2.3:9", True),
        (None, False),
        ("", False),
        ("evil.example", False),
        ("evil.example:40123", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("evil.localhost", False),
        ("128.0.0.1", False),
        ("0.0.0.0", False),
        ("192.168.1.10:40123", False),
        ("[::2]:40123", False),
        ("::1", False),  # an IPv6 address needs its brackets
        ("[::1", False),
        ("[::1]x", False),
        ("localhost:", False),
        ("localhost:http", False),
        ("localhost:65536", False),
        ("localhost:\uff11\uff12", False),  # non-ASCII digits
        ("127.1", False),
        ("localhost:80:80", False),
        (b"localhost\xff", False),
    ],
)
def test_host_allowed(host: str | None, ok: bool) -> None:
    assert host_allowed(host, "10.1.2.3") is ok


def test_header_lookup_is_case_insensitive_and_joins_repeats() -> None:
    pairs = [(b"host", b"localhost"), ("X-A", "1"), (b"x-a", b" 2 ")]
    assert header(pairs, "Host") == b"localhost"
    assert header(pairs, "x-a") == b"1, 2"
    assert header(pairs, "origin") is None


@pytest.mark.parametrize(
    ("method", "path", "required"),
    [
        ("GET", "/status", False),
        ("HEAD", "/status", False),
        ("POST", "/status", True),
        ("GET", "/status/", True),
        ("GET", "/statusx", True),
        ("GET", "/sessions", True),
        ("GET", "/", True),
        ("GET", "/no/such/path", True),
    ],
)
def test_only_reading_status_needs_no_token(method: str, path: str, required: bool) -> None:
    assert requires_token(method, path) is required


TCP = Policy(token=TOKEN, allowed_origins=frozenset({"http://ok.example"}),
             bound_host="127.0.0.1")
GOOD = ("Authorization", f"Bearer {TOKEN}")
LOCAL = ("Host", "127.0.0.1:5000")


@pytest.mark.parametrize(
    ("policy", "headers", "token_required", "status"),
    [
        (TCP, [GOOD, LOCAL], True, None),
        (TCP, [LOCAL], True, 401),
        (TCP, [("Authorization", "Bearer nope"), LOCAL], True, 401),
        # The token comes first: nothing else is said to a client without it.
        (TCP, [("Host", "evil.example"), ("Origin", "http://evil.example")], True, 401),
        (TCP, [GOOD, LOCAL, ("Origin", "http://evil.example")], True, 403),
        (TCP, [GOOD, LOCAL, ("Origin", "http://ok.example")], True, None),
        (TCP, [GOOD, ("Host", "evil.example")], True, 403),
        (TCP, [GOOD], True, 403),  # no Host at all
        # /status: no token, but Origin and Host still apply.
        (TCP, [LOCAL], False, None),
        (TCP, [("Host", "evil.example:5000")], False, 403),
        (TCP, [LOCAL, ("Origin", "http://evil.example")], False, 403),
        # --token none: the token check is off, nothing else is.
        (Policy(token=None, bound_host="127.0.0.1"), [LOCAL], True, None),
        (Policy(token=None, bound_host="127.0.0.1"), [("Host", "evil.example")], True, 403),
        (Policy(token=None, bound_host="127.0.0.1"), [LOCAL, ("Origin", "http://x")], True, 403),
        # A Unix socket: no Host check (clients send the socket path, or anything).
        (Policy(token=TOKEN), [GOOD, ("Host", "/run/user/1000/kc-1.sock")], True, None),
        (Policy(token=TOKEN), [GOOD], True, None),
        (Policy(token=TOKEN), [("Host", "localhost")], True, 401),
        (Policy(token=TOKEN), [GOOD, ("Origin", "http://evil.example")], True, 403),
    ],
)
def test_check_request(policy: Policy, headers: list[tuple[str, str]], token_required: bool,
                       status: int | None) -> None:
    refusal = check_request(policy, headers, token_required=token_required)
    assert (refusal.status if refusal else None) == status
    if refusal is not None:
        assert TOKEN not in refusal.reason
    if status == 401:
        assert refusal == MISSING_OR_WRONG_TOKEN


def test_policies_from_the_config() -> None:
    config = Config(token=TOKEN, allowed_origins=frozenset({"http://ok.example"}))
    assert policy_for(config, tcp=True) == Policy(
        token=TOKEN, allowed_origins=frozenset({"http://ok.example"}), bound_host="127.0.0.1")
    assert policy_for(config, tcp=False).bound_host is None
    check = session_socket_check(config)
    assert check([(b"host", b"evil.example"), (b"authorization", f"Bearer {TOKEN}".encode())]) \
        is None
    refusal = check([(b"host", b"localhost")])
    assert refusal is not None and refusal.status == 401
