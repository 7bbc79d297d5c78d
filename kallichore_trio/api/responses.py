"""Small helpers shared by the routes: JSON and error responses, auth, body parsing."""

from __future__ import annotations

import functools
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from quart import Response, request

from kallichore_trio.errors import KallichoreError, StartupFailure
from kallichore_trio.models import BodyError, dump, parse_body, unknown_fields

log = logging.getLogger(__name__)
T = TypeVar("T")


def json_response(value: Any, status: int = 200) -> Response:
    """A JSON body; models are unstructured first. `None` is the JSON literal null."""
    body = json.dumps(dump(value) if hasattr(value, "__attrs_attrs__") else value)
    return Response(body, status=status, content_type="application/json")


def empty(status: int) -> Response:
    """401/404/405: an empty body and no content type, as the reference answers."""
    response = Response(b"", status=status)
    response.headers.pop("Content-Type", None)
    return response


def text(message: str, status: int = 400) -> Response:
    return Response(message, status=status, content_type="text/plain; charset=utf-8")


def error_response(exc: KallichoreError) -> Response:
    if exc.http_status == 404:
        return empty(404)
    return json_response(exc.to_dict(), exc.http_status)


def startup_error_response(exc: StartupFailure) -> Response:
    return json_response(exc.to_dict(), 500)


def check_token(expected: str | None) -> bool:
    if expected is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


Handler = Callable[..., Awaitable[Response]]


def authenticated(token: str | None) -> Callable[[Handler], Handler]:
    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Response:
            if not check_token(token):
                # Never log the token a client sent: it may be a real one for another server.
                log.warning("rejected %s %s: missing or wrong bearer token",
                            request.method, request.path)
                return empty(401)
            return await handler(*args, **kwargs)

        return wrapper

    return decorate


class ParsedBody:
    """A parsed request body and the top-level keys that were ignored."""

    def __init__(self, value: Any, ignored: list[str]) -> None:
        self.value = value
        self.ignored = ignored


async def read_body(cls: type[T], schema: str, *, required: bool = True) -> ParsedBody:
    raw = await request.get_data()
    value = parse_body(raw, cls, schema=schema, required=required)
    ignored: list[str] = []
    if value is not None:
        try:
            ignored = unknown_fields(json.loads(raw), cls)
        except ValueError:
            ignored = []
    return ParsedBody(value, ignored)


def with_warning(response: Response, ignored: list[str]) -> Response:
    if ignored:
        response.headers["warning"] = f"Ignoring unknown fields in body: {ignored}"
    return response


__all__ = [
    "BodyError",
    "authenticated",
    "empty",
    "error_response",
    "json_response",
    "read_body",
    "startup_error_response",
    "text",
    "with_warning",
]
