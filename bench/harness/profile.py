"""py-spy profiles of a server process during a flood (``--profile``), summarised as text."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


class PySpy:
    def __init__(self, py_spy: str, pid: int, out: Path) -> None:
        self.out = out
        argv = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
                "--format", "raw", "--output", str(out)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.proc.wait, 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarize(collapsed: Path, top: int = 15) -> list[str]:
    """Top functions by self time and by inclusive time, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if total == 0:
        return ["(no samples)"]
    out = [f"{total} samples; self time:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out.append("inclusive time:")
    out += [f"  {n / total:6.1%}  {f}" for f, n in incl.most_common(top)]
    return out
