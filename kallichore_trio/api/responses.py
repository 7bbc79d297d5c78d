"""Small helpers shared by the routes: JSON and error responses, body parsing."""

from __future__ import annotations

import json
import logging
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
    "empty",
    "error_response",
    "json_response",
    "read_body",
    "startup_error_response",
    "text",
    "with_warning",
]
