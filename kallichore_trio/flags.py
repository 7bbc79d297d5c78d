"""The value types of kcserver's flags: each turns a flag's text into a value, or raises
argparse.ArgumentTypeError saying what is wrong (argparse prints it and exits 2)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable


def uint16(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..65535")
    return value


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"'{text}' is not true or false")
    return value == "true"


def poll_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of milliseconds") from None
    if not 0 <= value <= 100:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is not in 0..100 ms")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


def origin(text: str) -> str:
    """An origin as browsers serialize it in the Origin header: `scheme://host[:port]`,
    lowercase, no path. `null` (sandboxed and file: pages) is refused: any page can send it."""
    value = text.strip().lower()
    scheme, sep, rest = value.partition("://")
    if (not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not rest
            or not rest.isascii() or any(c in rest for c in "/?#@ ")):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not an origin; expected scheme://host[:port], e.g. "
            "http://localhost:3000")
    return value
