"""What `kc` prints: plain text on a pipe, colour and tables on a terminal (rich), images saved
to files; and running a job the user can interrupt with Ctrl-C. Shared by kc.py and
kc_attach.py."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs

from kallichore_trio.client import messages as m
from kallichore_trio.client.errors import ClientError
from kallichore_trio.client.sync import Client, Session, _spawn

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif",
               "image/svg+xml": "svg"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")



@attrs.define
class Output:
    """Where kc writes; `tty` decides colours and tables."""

    out: TextIO
    err: TextIO
    json: bool
    tty: bool

    def print_json(self, value: Any) -> None:
        self.out.write(json.dumps(value, indent=2, default=str) + "\n")
        self.out.flush()

    def table(self, columns: Sequence[str], rows: list[list[str]]) -> None:
        if self.tty:
            from rich.console import Console
            from rich.table import Table

            table = Table(*columns, box=None, header_style="bold",
                          show_header=any(columns))
            for row in rows:
                table.add_row(*row)
            Console(file=self.out).print(table)
            return
        if any(columns):
            self.out.write("\t".join(columns) + "\n")
        for row in rows:
            self.out.write("\t".join(row) + "\n")
        self.out.flush()

    def text(self, text: str) -> str:
        return text if self.tty else _ANSI.sub("", text)


def notice_text(event: m.KernelEvent) -> str | None:
    """What kc says on stderr when the daemon reports lost frames (docs/client.md, "Resuming a
    broken channel"); None for other events and for history from before kc attached."""
    if isinstance(event, m.FramesLost) and not event.history:
        count = event.last - event.first + 1
        frames = f"{count} frames of the session's output were" if count != 1 else (
            "1 frame of the session's output was")
        return (f"{frames} lost "
                f"(numbers {event.first}-{event.last}) while the connection was being resumed; "
                "what is shown may be incomplete")
    if isinstance(event, m.SupervisorRestarted) and not event.history:
        gap = f" after {event.gap_ms} ms without one" if event.gap_ms is not None else ""
        return (f"the daemon was restarted{gap}; what the kernel sent meanwhile is lost and "
                "what is shown may be incomplete")
    return None


def print_notices(io: Output, session_id: str) -> Callable[[m.KernelEvent], None]:
    """An `on_notice` callback writing `notice_text` lines to stderr."""
    def show(event: m.KernelEvent) -> None:
        text = notice_text(event)
        if text is not None:
            io.err.write(f"kc: session {session_id}: {text}\n")
            io.err.flush()

    return show


class Printer:
    """Writes one execution's messages as they come: streams to stdout/stderr, results and
    display data as text, images to files, the traceback to stderr."""

    def __init__(self, io: Output, session_id: str, images_dir: Path,
                 prompt_results: bool = False) -> None:
        self.io = io
        self.session_id = session_id
        self.images_dir = images_dir
        self.prompt_results = prompt_results
        self.images = 0

    def __call__(self, msg: m.Message) -> None:
        io, content = self.io, msg.content
        if msg.msg_type == "stream":
            target = io.err if content.get("name") == "stderr" else io.out
            target.write(str(content.get("text", "")))
            target.flush()
        elif msg.msg_type in ("execute_result", "display_data"):
            data = content.get("data") or {}
            saved = self._save_images(data)
            if not saved and "text/plain" in data:
                text = str(data["text/plain"])
                if msg.msg_type == "execute_result" and self.prompt_results:
                    text = f"Out[{content.get('execution_count')}]: {text}"
                io.out.write(io.text(text) + "\n")
            io.out.flush()
        elif msg.msg_type == "error":
            io.err.write(io.text("\n".join(str(line) for line in content.get("traceback", [])))
                         + "\n")
            io.err.flush()

    def _save_images(self, data: dict[str, Any]) -> bool:
        saved = False
        for mime, ext in IMAGE_TYPES.items():
            if mime not in data:
                continue
            self.images += 1
            path = self.images_dir / f"{self.session_id}-{os.getpid()}-{self.images}.{ext}"
            raw = data[mime]
            payload = raw.encode() if mime == "image/svg+xml" else base64.b64decode(raw)
            self.images_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
            self.io.out.write(f"[{mime} saved to {path}]\n")
            saved = True
            break
        return saved


def run_interruptibly(client: Client, session: Session, job: Callable[[], Any]) -> Any:
    """Run `job` (a coroutine function) in the client's loop; Ctrl-C interrupts the kernel
    (the job goes on and finishes with the interrupted execution). Returns job's result."""
    done = threading.Event()
    box: dict[str, Any] = {}

    async def run() -> None:
        try:
            box["value"] = await job()
        except Exception as exc:  # handed to the main thread, which raises it
            box["error"] = exc
        finally:
            done.set()

    client._run(_spawn, client.aclient._nursery, run)
    interrupted = False
    while not done.is_set():
        try:
            done.wait()
        except KeyboardInterrupt:
            interrupted = True
            try:
                session.interrupt()
            except ClientError:
                pass  # the kernel is gone or going: the job reports what followed
    if "error" in box:
        raise box["error"]
    box["interrupted"] = interrupted
    return box
