"""Resume soak: a flood through many disconnects and daemon kills (`make soak`).

A real kcserver (TCP) runs a flood kernel (tests/kernels/mini_kernel.py, mode `flood`); a raw
resuming client (tests/resume_client.py) receives --messages numbered stream lines while it
breaks its connection --disconnects times at seeded random points (a clean close, a TCP reset,
half a frame), resuming each time with the last sequence number it processed. --kills of those
breaks are daemon crashes instead: SIGKILL, a new kcserver on the same --state-dir, which
re-attaches the running kernel, and the client resumes against it.

What it prints: frames received; seqs that arrived again after being processed (a bug if not
0); frames received before a break but not processed, which came again after resuming (the
client drops the rest of its read at a break, so these are the frames re-sent because they
were not acknowledged); framesLost ranges and frames (expected only after kills); indices the
kernel published while no daemon listened (lost with the dead daemon, expected); the wall time;
the daemons' peak RSS; and whether every index outside what a kill lost arrived exactly once, in
order. Figures go in docs/performance.md ("Resume soak").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import (
    KCSERVER,
    STARTUP_TIMEOUT,
    Server,
    launch,
    mini_argv,
    new_session_body,
)
from tests.resume_client import FloodRun, ResumeSocket, break_points, channels_target


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.stack = contextlib.AsyncExitStack()
        self.server: Server | None = None
        self.session_id = f"soak-{uuid.uuid4().hex[:8]}"
        self.kernel_pid: int | None = None
        self.daemons = 0
        self.peak_rss: list[int] = []  # per daemon
        self.kill_log: list[dict[str, Any]] = []

    async def start_daemon(self) -> Server:
        self.daemons += 1
        work = self.root / f"d{self.daemons}"
        work.mkdir()
        args = ["--connection-file", str(work / "conn.json"), "--transport", "tcp",
                "--state-dir", str(self.root / "state")]
        server = await self.stack.enter_async_context(launch(args, work))
        self.server = server
        self.peak_rss.append(0)
        return server

    def client(self) -> httpx.AsyncClient:
        assert self.server is not None
        client = self.server.client()
        client.timeout = httpx.Timeout(60)
        return client

    async def wait_idle(self) -> None:
        async with self.client() as client:
            with trio.fail_after(60):
                while (await client.get(f"/sessions/{self.session_id}")).json()[
                        "status"] != "idle":
                    await trio.sleep(0.05)

    async def sample_rss(self) -> None:
        while True:
            server = self.server
            if server is not None and server.process.returncode is None:
                with contextlib.suppress(psutil.Error):
                    rss = psutil.Process(server.process.pid).memory_info().rss
                    self.peak_rss[-1] = max(self.peak_rss[-1], rss)
            await trio.sleep(0.1)

    async def connect(self, resume: int) -> tuple[ResumeSocket, list[str]]:
        assert self.server is not None
        url = urlsplit(self.server.doc["base_path"])
        assert url.hostname is not None and url.port is not None
        first: list[str] = []
        ws = await ResumeSocket.open_tcp(url.hostname, url.port,
                                         channels_target(self.session_id, resume),
                                         self.server.doc.get("bearer_token"), first)
        return ws, first

    async def kill(self, break_no: int) -> None:
        """SIGKILL the daemon and start the next on the same state directory."""
        assert self.server is not None
        began = time.monotonic()
        self.server.process.send_signal(signal.SIGKILL)
        with trio.fail_after(STARTUP_TIMEOUT):
            await self.server.process.wait()
        await self.start_daemon()
        await self.wait_idle()
        self.kill_log.append({"break": break_no, "processed": self.run.tracker.processed,
                              "restart_s": round(time.monotonic() - began, 2)})

    async def main(self) -> dict[str, Any]:
        args = self.args
        rng = random.Random(args.seed)
        async with self.stack, trio.open_nursery() as nursery:
            await self.start_daemon()
            nursery.start_soon(self.sample_rss)
            async with self.client() as client:
                body = new_session_body(self.session_id, mini_argv("flood"))
                created = await client.put("/sessions", json=body)
                assert created.status_code == 200, created.text
                started = await client.post(f"/sessions/{self.session_id}/start")
                assert started.status_code == 200, started.text
                self.kernel_pid = (await client.get(
                    f"/sessions/{self.session_id}")).json()["process_id"]
            # Breaks are counted in frames processed; the kills lose some lines, so the
            # last tenth is left out to make sure every break happens.
            breaks = break_points(rng, args.disconnects, int(args.messages * 0.9))
            kills = set(rng.sample(range(args.disconnects), args.kills))
            self.run = FloodRun(total=args.messages, chunk=args.chunk, window=args.window,
                                rng=rng, connect=self.connect, breaks=breaks, kills=kills,
                                on_kill=self.kill)
            began = time.monotonic()
            try:
                with trio.fail_after(args.timeout):
                    await self.run.run()
                wall = time.monotonic() - began
            finally:
                with contextlib.suppress(Exception):
                    with trio.CancelScope(shield=True), trio.move_on_after(40):
                        assert self.server is not None
                        self.server.process.send_signal(signal.SIGTERM)
                        await self.server.process.wait()
                if self.kernel_pid is not None:
                    with contextlib.suppress(OSError):
                        os.killpg(self.kernel_pid, signal.SIGKILL)
            nursery.cancel_scope.cancel()
        return self.figures(wall)

    def figures(self, wall: float) -> dict[str, Any]:
        run, tracker = self.run, self.run.tracker
        lost_indices = sum(b - a + 1 for a, b, _ in tracker.index_gaps)
        exact = (not tracker.violations and tracker.duplicates == 0
                 and tracker.duplicate_indices == 0
                 and all(explained for _, _, explained in tracker.index_gaps)
                 and tracker.next_index == self.args.messages)
        return {
            "seed": self.args.seed,
            "messages": self.args.messages,
            "chunk": self.args.chunk,
            "window": self.args.window,
            "disconnects": dict(run.break_counts),
            "daemon_kills": len(self.kill_log),
            "connections": run.connections,
            "acks_sent": run.acks,
            "frames_received": tracker.frames,
            "seqs_received_again_after_processing": tracker.duplicates,
            "frames_resent_after_reconnect_unprocessed": tracker.resent,
            "frames_lost_ranges": tracker.lost_ranges,
            # Includes the numbers of a dead daemon's reserved block it never used.
            "frames_lost_numbers": tracker.lost_frames(),
            "restart_seq_gaps": tracker.restart_gaps,
            "indices_missing": lost_indices,  # all at kills when paced
            "index_gaps": tracker.index_gaps,
            "violations": tracker.violations[:20],
            "every_other_index_once_in_order": exact,
            "wall_s": round(wall, 1),
            "frames_per_s": round(tracker.frames / wall),
            "daemon_peak_rss_mib": [round(r / 2**20, 1) for r in self.peak_rss],
            "kills": self.kill_log,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--disconnects", type=int, default=100)
    parser.add_argument("--kills", type=int, default=5,
                        help="how many of the disconnects are daemon kills")
    parser.add_argument("--chunk", type=int, default=2_000,
                        help="indices per execute_request")
    parser.add_argument("--window", type=int, default=3,
                        help="execute_requests outstanding at once")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if not KCSERVER.exists():
        print(f"{KCSERVER} is missing: make .venv/.installed-stamp", file=sys.stderr)
        return 2
    print(f"resume soak, seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kc-soak-", dir="/tmp") as root:
        figures = trio.run(Soak(args, Path(root)).main)
    for key, value in figures.items():
        print(f"{key:45} {json.dumps(value)}")
    return 0 if figures["every_other_index_once_in_order"] else 1


if __name__ == "__main__":
    sys.exit(main())
