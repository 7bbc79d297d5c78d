"""The final table: absolute figures per target, ratios to the raw floor and to Jupyter Server,
and the issue's targets with pass/fail for kallichore-trio."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RAW, KT, JS = "raw", "kallichore-trio", "jupyter-server"

Values = dict[str, Any]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _rtt(v: Values) -> bool | None:
    kt, raw, js = _num(v.get(KT)), _num(v.get(RAW)), _num(v.get(JS))
    if kt is None or raw is None:
        return None
    return kt <= 1.2 * raw and (js is None or kt < js)


def _ratio_min(key: str, floor: float) -> Callable[[Values], bool | None]:
    def check(v: Values) -> bool | None:
        kt, ref = _num(v.get(KT)), _num(v.get(key))
        return None if kt is None or ref is None else kt >= floor * ref

    return check


def _below(limit: float) -> Callable[[Values], bool | None]:
    def check(v: Values) -> bool | None:
        kt = _num(v.get(KT))
        return None if kt is None else kt < limit

    return check


def _at_least(limit: float) -> Callable[[Values], bool | None]:
    def check(v: Values) -> bool | None:
        kt = _num(v.get(KT))
        return None if kt is None else kt >= limit

    return check


def _true(v: Values) -> bool | None:
    return None if v.get(KT) is None else v.get(KT) is True


def _zero(v: Values) -> bool | None:
    return None if v.get(KT) is None else v.get(KT) == 0


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fmt: str
    target: str = ""
    check: Callable[[Values], bool | None] | None = None


ROWS = [
    Row("rtt_median_ms", "execute RTT median (ms, lower better)", "{:.2f}",
        "<=1.2x raw, < JS", _rtt),
    Row("rtt_p99_ms", "execute RTT p99 (ms)", "{:.2f}"),
    Row("rtt_server_cpu_us", "server CPU per round trip (us)", "{:.0f}"),
    Row("output_msgs_per_s", "flushed output (msg/s, higher better)", "{:,.0f}",
        ">=0.95x raw", _ratio_min(RAW, 0.95)),
    Row("output_in_order", "flushed output: all lines, in order", "{}", "yes", _true),
    Row("output_cpu_us_per_msg", "server CPU per flushed msg (us)", "{:.1f}"),
    Row("output_kernel_cpu_us_per_msg", "kernel CPU per flushed msg (us)", "{:.1f}"),
    Row("floor_rtt_median_ms", "RTT, kernel that answers at once (ms)", "{:.2f}"),
    Row("floor_rtt_server_cpu_us", "server CPU per such round trip (us)", "{:.0f}"),
    Row("relay_msgs_per_s", "relay ceiling (msg/s, higher better)", "{:,.0f}",
        ">=30,000", _at_least(30_000)),
    Row("relay_delivered", "relay: every message, in order", "{}", "yes", _true),
    Row("relay_cpu_us_per_msg", "server CPU per relayed msg (us)", "{:.1f}", "<50", _below(50)),
    Row("start_single_s", "kernel start to kernel_info (s)", "{:.2f}"),
    Row("start_concurrent_total_s", "N kernels at once: total (s)", "{:.2f}"),
    Row("start_concurrent_failures", "N kernels at once: failures", "{}", "0", _zero),
    Row("rss_before_mb", "server RSS before N starts (MiB)", "{:.1f}"),
    Row("rss_after_mb", "server RSS with N kernels (MiB)", "{:.1f}"),
    Row("interrupt_ms", "interrupt latency, sleeping cell (ms)", "{:.1f}"),
    Row("idle_cpu_percent", "idle server CPU, N sessions (% core)", "{:.2f}", "<2%", _below(2)),
]  # fmt: skip


def _cell(fmt: str, v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return fmt.format(v)


def _ratio(a: Any, b: Any) -> str:
    a, b = _num(a), _num(b)
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def build(metrics: dict[str, Values]) -> list[dict[str, str]]:
    rows = []
    for row in ROWS:
        v = metrics.get(row.key)
        if v is None:
            continue
        ok = row.check(v) if row.check else None
        rows.append({
            "metric": row.label,
            RAW: _cell(row.fmt, v.get(RAW)),
            KT: _cell(row.fmt, v.get(KT)),
            JS: _cell(row.fmt, v.get(JS)),
            "kt/raw": _ratio(v.get(KT), v.get(RAW)),
            "kt/JS": _ratio(v.get(KT), v.get(JS)),
            "target": row.target,
            "result": "" if row.check is None else {True: "PASS", False: "FAIL", None: "?"}[ok],
        })  # fmt: skip
    return rows


def render(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    right = {RAW, KT, JS, "kt/raw", "kt/JS"}

    def line(cells: dict[str, str]) -> str:
        parts = [cells[c].rjust(width[c]) if c in right else cells[c].ljust(width[c]) for c in cols]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join("-" * (width[c] + 2) for c in cols) + "|"
    return "\n".join([line({c: c for c in cols}), sep, *(line(r) for r in rows)])
