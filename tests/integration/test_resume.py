"""Resuming a client connection exactly where it stopped (docs/durability.md, last section).

A raw WebSocket client (tests/resume_client.py) sees the wire as it is: `seq` as the first field,
`framesLost` notices, acks. The flood kernel (tests/kernels/mini_kernel.py, mode `flood`)
publishes numbered stream messages, so "every index exactly once, in order" is checkable.
The flood and the crash run on real `kcserver` processes; the small cases use an in-process
daemon where they need a configuration kcserver has no flag for (a small outbox).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from kallichore_trio.config import OutboxLimits
from tests.helpers import (
    KCSERVER,
    STARTUP_TIMEOUT,
    TOKEN,
    RunningDaemon,
    Server,
    daemon_config,
    execute,
    kernel_event,
    launch,
    launch_on_state_dir,
    mini_argv,
    new_session_body,
    open_channel,
    running_daemon,
    running_unix_daemon,
    stop,
)
from tests.resume_client import (
    FloodRun,
    ResumeSocket,
    ResumeTracker,
    UpgradeRefused,
    break_points,
    channels_target,
    execute_message,
    seq_of,
)

pytestmark = pytest.mark.skipif(
    not KCSERVER.exists(), reason="kcserver is not installed: pip install -e '.[test]'"
)

Frame = dict[str, Any]


# ---- daemons, sessions, connections -------------------------------------------------------


async def flood_session(client: httpx.AsyncClient, pids: set[int]) -> str:
    session_id = f"flood-{uuid.uuid4().hex[:8]}"
    created = await client.put("/sessions",
                               json=new_session_body(session_id, mini_argv("flood")))
    assert created.status_code == 200, created.text
    started = await client.post(f"/sessions/{session_id}/start", timeout=60)
    assert started.status_code == 200, started.text
    pid = (await client.get(f"/sessions/{session_id}")).json()["process_id"]
    pids.add(pid)
    return session_id


async def wait_idle(client: httpx.AsyncClient, session_id: str) -> None:
    with trio.fail_after(30):
        while (await client.get(f"/sessions/{session_id}")).json()["status"] != "idle":
            await trio.sleep(0.05)


def tcp_connect(base: str, token: str | None, session_id: str) -> Any:
    """`connect(resume)` for FloodRun: a resuming connection to the TCP API at `base`."""
    url = urlsplit(base)
    assert url.hostname is not None and url.port is not None

    async def connect(resume: int) -> tuple[ResumeSocket, list[str]]:
        first: list[str] = []
        ws = await ResumeSocket.open_tcp(url.hostname, url.port,
                                         channels_target(session_id, resume), token, first)
        return ws, first

    return connect


def server_connect(server: Server, session_id: str) -> Any:
    return tcp_connect(server.doc["base_path"], server.doc.get("bearer_token"), session_id)


def daemon_connect(daemon: RunningDaemon, session_id: str) -> Any:
    return tcp_connect(daemon.base, TOKEN, session_id)


async def run_code(ws: ResumeSocket, pending: list[str], code: str,
                   tracker: ResumeTracker | None = None) -> list[str]:
    """Send an execute_request; every frame text up to both its idle status (iopub, so after
    all its output) and its execute_reply (shell: before or after the idle), processed by
    `tracker` when given."""
    msg_id = uuid.uuid4().hex
    await ws.send_json(execute_message(code, msg_id))
    texts = []
    idle = replied = False
    with trio.fail_after(60):
        while not (idle and replied):
            text = await ws.receive_one(pending)
            texts.append(text)
            frame = tracker.process(text) if tracker is not None else json.loads(text)
            if (frame.get("kind") != "jupyter"
                    or (frame["parent_header"] or {}).get("msg_id") != msg_id):
                continue
            msg_type = frame["header"]["msg_type"]
            replied = replied or msg_type == "execute_reply"
            idle = idle or (msg_type == "status"
                            and frame["content"]["execution_state"] == "idle")
    return texts


def indices(frames: list[Frame]) -> list[int]:
    return [int(f["content"]["text"]) for f in frames
            if f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream"]


@pytest.fixture
async def small_outbox_daemon(nursery: trio.Nursery,
                              tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    """kcserver has no flag for the outbox bounds: an in-process daemon with a small one."""
    config = daemon_config(tmp_path, outbox=OutboxLimits(max_frames=200,
                                                         max_bytes=64 * 1024 * 1024))
    async for running in running_daemon(nursery, config):
        yield running


# ---- the flood ----------------------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_a_flood_through_fifty_disconnects_arrives_exactly_once_in_order(
        short_dir: Path, kernel_pids: set[int]) -> None:
    seed = int(os.environ.get("RESUME_SEED") or random.randrange(2**32))
    print(f"RESUME_SEED={seed}")
    rng = random.Random(seed)
    total = 200_000
    async with launch_on_state_dir(short_dir, "a") as server:
        async with server.client() as client:
            session_id = await flood_session(client, kernel_pids)
        run = FloodRun(total=total, chunk=2_000, window=3, rng=rng,
                       connect=server_connect(server, session_id),
                       breaks=break_points(rng, 50, total))
        with trio.fail_after(540):
            await run.run()
        await stop(server, "sigterm")
    tracker = run.tracker
    print(f"breaks {run.break_counts}, {run.connections} connections, {run.acks} acks, "
          f"{tracker.frames} frames, {tracker.resent} received again after a break")
    assert tracker.violations == []
    assert tracker.lost_ranges == [] and tracker.restarts == []
    assert tracker.duplicates == 0 and tracker.duplicate_indices == 0
    assert tracker.index_gaps == []
    assert tracker.next_index == total
    assert run.connections == 51 and run.closed_by_daemon == 0
    assert all(n > 0 for n in run.break_counts.values()), run.break_counts


# ---- the envelope -------------------------------------------------------------------------


async def test_seq_is_the_first_field_and_counts_up_only_when_resuming(
        short_dir: Path, kernel_pids: set[int]) -> None:
    async with launch_on_state_dir(short_dir, "a") as server:
        async with server.client() as client:
            session_id = await flood_session(client, kernel_pids)
        url = urlsplit(server.doc["base_path"])
        token = server.doc["bearer_token"]
        assert url.hostname and url.port

        pending: list[str] = []
        plain = await ResumeSocket.open_tcp(url.hostname, url.port,
                                            channels_target(session_id, None), token, pending)
        plain_texts = await run_code(plain, pending, "5")
        assert all(t.startswith('{"kind":') for t in plain_texts), plain_texts
        await plain.close_clean()

        connect = server_connect(server, session_id)
        ws, pending = await connect(0)
        tracker = ResumeTracker(keep=True)
        resumed = await run_code(ws, pending, "5", tracker)
        await ws.close_clean()
        await stop(server, "sigterm")

    # The plain client was sent every frame before, which released them: the resuming
    # client is told so, then gets numbered frames, one more each time.
    assert tracker.violations == []
    assert tracker.lost_ranges and tracker.lost_ranges[0][0] == 1
    seqs = [s for s, _ in tracker.items if s is not None]
    assert seqs == list(range(tracker.lost_ranges[-1][1] + 1, tracker.processed + 1))
    assert all(re.match(r'\{"seq":[1-9][0-9]*,"kind":', t) for t in resumed
               if seq_of(t) is not None)
    assert indices([f for _, f in tracker.items]) == [5, 6, 7, 8, 9]

    # Byte for byte, a numbered frame is the plain one with `"seq":N,` after its brace:
    # the daemon's own events (no ids or dates in them) are the very same texts.
    def stripped(text: str) -> str:
        return "{" + text[text.index(",") + 1:]

    def events(texts: list[str]) -> list[str]:
        return [t for t in texts if t.startswith('{"kind":"kernel","status"')]

    numbered_events = events([stripped(t) for t in resumed if seq_of(t) is not None])
    assert numbered_events and set(numbered_events) <= set(events(plain_texts))
    # Kernel messages keep their fields in the same order.
    by_type = {json.loads(t)["header"]["msg_type"]: list(json.loads(t))
               for t in plain_texts if t.startswith('{"kind":"jupyter"')}
    for text in resumed:
        if text.startswith('{"seq":') and '"kind":"jupyter"' in text[:30]:
            frame = json.loads(stripped(text))
            assert list(frame) == by_type[frame["header"]["msg_type"]]


async def test_resume_zero_replays_every_unacknowledged_frame_from_the_start(
        short_dir: Path, kernel_pids: set[int]) -> None:
    async with launch_on_state_dir(short_dir, "a") as server:
        async with server.client() as client:
            session_id = await flood_session(client, kernel_pids)
        connect = server_connect(server, session_id)

        ws, pending = await connect(0)
        first = await run_code(ws, pending, "50")
        await ws.close_clean()  # nothing acknowledged

        ws, pending = await connect(0)
        tracker = ResumeTracker(keep=True)
        with trio.fail_after(30):
            again = [await ws.receive_one(pending) for _ in first]
        # The same frames, byte for byte, numbered from 1.
        assert again == first
        assert seq_of(again[0]) == 1
        for text in again:
            tracker.process(text)
        await ws.ack(tracker.processed)
        await ws.close_clean()

        # Acknowledged: resuming from there resends nothing, and new frames follow on.
        ws, pending = await connect(tracker.processed)
        more = await run_code(ws, pending, "3", tracker)
        await ws.close_clean()
        await stop(server, "sigterm")
    assert seq_of(more[0]) == len(first) + 1
    assert tracker.violations == [] and tracker.lost_ranges == []
    assert indices([f for _, f in tracker.items]) == list(range(53))


# ---- overflow -----------------------------------------------------------------------------


async def test_an_overflow_while_away_is_reported_as_ordered_lost_ranges(
        small_outbox_daemon: RunningDaemon) -> None:
    daemon = small_outbox_daemon
    session_id = await daemon.create(argv=mini_argv("flood"))
    assert (await daemon.start(session_id)).status_code == 200
    connect = daemon_connect(daemon, session_id)
    tracker = ResumeTracker(keep=True)

    ws, pending = await connect(0)
    await run_code(ws, pending, "0", tracker)
    await ws.ack(tracker.processed)
    await ws.close_clean()
    away = tracker.processed

    # While no client is there the kernel publishes far more than the 200 frames the outbox
    # keeps; a status after every 250 lines, and the second request's busy, are kept.
    for code in ('{"first": 0, "count": 1000, "status_every": 250}', "300"):
        response = await execute(daemon, session_id, code)
        assert response.status_code == 200, response.text

    ws, pending = await connect(away)
    tracker.items.clear()
    await run_code(ws, pending, "0", tracker)
    await ws.close_clean()

    assert tracker.violations == []
    lost = tracker.lost_ranges
    print(f"lost ranges {lost}, kept lines {len(indices([f for _, f in tracker.items]))}")
    assert len(lost) >= 2, lost
    first_seq, _ = tracker.items[0]
    assert (first_seq or lost[0][0]) == away + 1
    # In order, disjoint, and each followed by a kept frame (never two notices in a row).
    assert all(a <= b for a, b in lost)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(lost))
    kinds = ["lost" if s is None else "frame" for s, _ in tracker.items]
    assert "lost,lost" not in ",".join(kinds)
    # Every status and reply was kept; the stream lines kept are the newest, in order.
    frames = [f for _, f in tracker.items]
    kernel_statuses = [f for f in frames if f.get("kind") == "jupyter"
                       and f["header"]["msg_type"] == "status"]
    assert len(kernel_statuses) == 6 + 2 + 2  # busy, 4 marks, idle; busy, idle; busy, idle
    assert len([f for f in frames if f.get("kind") == "jupyter"
                and f["header"]["msg_type"] == "execute_reply"]) == 3
    kept = indices(frames)
    assert kept and kept == list(range(1300 - len(kept), 1300))
    assert tracker.lost_frames() >= 1300 - len(kept)


async def test_a_client_that_does_not_resume_is_told_how_many_frames_were_dropped(
        small_outbox_daemon: RunningDaemon) -> None:
    """Kallichore's envelope, no seq: the overflow is told once, as stderr output, before the
    frames that remain (ClientChannel._next_batch)."""
    daemon = small_outbox_daemon
    session_id = await daemon.create(argv=mini_argv("flood"))
    assert (await daemon.start(session_id)).status_code == 200
    response = await execute(daemon, session_id, "1000")  # no client: 1,000 lines, 200 kept
    assert response.status_code == 200, response.text
    async with open_channel(daemon, session_id) as channel:
        first = await channel.receive()
        notice = kernel_event(first, "output")
        assert notice is not None and notice[0] == "stderr", first
        dropped = int(re.match(r"\[kallichore-trio\] (\d+) output frames were dropped",
                               notice[1]).group(1))
        await channel.wait_for(lambda frame: frame.get("kind") == "jupyter"
                               and frame["header"]["msg_type"] == "status"
                               and frame["content"]["execution_state"] == "idle"
                               and frame["parent_header"]["msg_type"] == "execute_request")
        rest = channel.frames[1:]
    assert all("seq" not in frame for frame in channel.frames)
    lines = [int(f["content"]["text"]) for f in rest
             if f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream"]
    # What was dropped is the oldest stream output; what remains is the newest, in order.
    # The count told covers the missing lines, plus the kernel's own start-up line on stdout
    # (an `output` event, droppable too) when that one was shed as well.
    assert lines == list(range(1000 - len(lines), 1000))
    startup_output = [f for f in channel.frames[1:] if kernel_event(f, "output")]
    assert dropped + len(startup_output) in (1000 - len(lines), 1000 - len(lines) + 1)


async def test_the_outbox_bounds_are_set_on_the_command_line(
        short_dir: Path, kernel_pids: set[int]) -> None:
    """`kcserver --outbox-frames N`: a real daemon keeps N frames (statuses and replies aside)
    for a client that is away, and tells a resuming client what it shed."""
    work = short_dir / "bounded"
    work.mkdir()
    args = ["--connection-file", str(work / "conn.json"), "--transport", "tcp",
            "--state-dir", str(short_dir / "state"), "--outbox-frames", "100"]
    async with launch(args, work) as server:
        async with server.client() as client:
            session_id = await flood_session(client, kernel_pids)
            await wait_idle(client, session_id)
            response = await client.post(f"/sessions/{session_id}/execute",
                                         json={"code": "1000"}, timeout=60)
            assert response.status_code == 200, response.text
        connect = server_connect(server, session_id)
        ws, pending = await connect(0)
        tracker = ResumeTracker(keep=True)
        await run_code(ws, pending, "0", tracker)
        await ws.close_clean()
        await stop(server, "sigterm")
    kept = indices([f for _, f in tracker.items])
    assert tracker.violations == []
    assert tracker.lost_ranges, "1,000 lines with a 100-frame outbox and no client: some shed"
    assert len(kept) <= 100 and kept == list(range(1000 - len(kept), 1000))


# ---- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "-1", "abc", "9223372036854775808", "99999999999999999999999", "", "1.5", "1e3",
    "+1", "1_000", "%201", "0x10", "%D9%A3",  # the last: an Arabic-Indic digit three
])
async def test_a_bad_resume_value_is_refused_with_400_before_the_upgrade(
        daemon: RunningDaemon, value: str) -> None:
    session_id = await daemon.create(argv=mini_argv("flood"))
    url = urlsplit(daemon.base)
    assert url.hostname and url.port
    with pytest.raises(UpgradeRefused) as refused:
        await ResumeSocket.open_tcp(url.hostname, url.port, channels_target(session_id, value),
                                    TOKEN)
    assert refused.value.status == 400
    assert b"resume must be a non-negative integer" in refused.value.body


@pytest.mark.parametrize("value", ["0", "9223372036854775807", "007"])
async def test_the_bounds_of_resume_are_accepted(daemon: RunningDaemon, value: str) -> None:
    session_id = await daemon.create(argv=mini_argv("flood"))
    assert (await daemon.start(session_id)).status_code == 200
    ws, _ = await daemon_connect(daemon, session_id)(value)  # type: ignore[arg-type]
    await ws.close_clean()


# ---- the socket transport -----------------------------------------------------------------


async def test_resuming_on_a_sessions_unix_socket(nursery: trio.Nursery,
                                                  short_dir: Path) -> None:
    config = daemon_config(short_dir, transport="socket")
    async with running_unix_daemon(nursery, config) as daemon:
        session_id = await daemon.create(argv=mini_argv("flood"))
        assert (await daemon.start(session_id)).status_code == 200
        path = (await daemon.client.get(f"/sessions/{session_id}/channels")).json()

        async def connect(resume: int | str) -> tuple[ResumeSocket, list[str]]:
            first: list[str] = []
            ws = await ResumeSocket.open_unix(
                path, channels_target(session_id, resume, unix=True), TOKEN, first)
            return ws, first

        with pytest.raises(UpgradeRefused) as refused:
            await connect("-1")
        assert refused.value.status == 400

        tracker = ResumeTracker(keep=True)
        ws, pending = await connect(0)
        await run_code(ws, pending, "0", tracker)
        await ws.send_json(execute_message("100", uuid.uuid4().hex))
        # Process 40 lines, then go without acknowledging them.
        with trio.fail_after(30):
            while len(indices([f for _, f in tracker.items])) < 40:
                tracker.process(await ws.receive_one(pending))
        tracker.discarded(pending)
        await ws.close_reset()

        ws, pending = await connect(tracker.processed)
        await run_code(ws, pending, "0", tracker)
        await ws.close_clean()
    assert tracker.violations == [] and tracker.lost_ranges == []
    assert indices([f for _, f in tracker.items]) == list(range(100))
    assert all(s is not None for s, _ in tracker.items)


# ---- across a daemon crash ----------------------------------------------------------------


async def test_resuming_after_a_daemon_crash(short_dir: Path, kernel_pids: set[int]) -> None:
    tracker = ResumeTracker(keep=True)
    async with launch_on_state_dir(short_dir, "a") as first:
        async with first.client() as client:
            session_id = await flood_session(client, kernel_pids)
        ws, pending = await server_connect(first, session_id)(0)
        await run_code(ws, pending, "100", tracker)
        await ws.ack(tracker.processed)
        before = tracker.processed
        first.process.send_signal(signal.SIGKILL)
        with trio.fail_after(STARTUP_TIMEOUT):
            await first.process.wait()
        await trio.aclose_forcefully(ws.stream)

    async with launch_on_state_dir(short_dir, "b") as second:
        async with second.client() as client:
            await wait_idle(client, session_id)
        ws, pending = await server_connect(second, session_id)(before)
        tracker.items.clear()
        with trio.fail_after(30):
            tracker.process(await ws.receive_one(pending))
            tracker.process(await ws.receive_one(pending))
        await run_code(ws, pending, "10", tracker)
        await ws.close_clean()
        await stop(second, "sigterm")

    (restart_seq, restarted), (no_seq, lost) = tracker.items[:2]
    assert restarted["kind"] == "kernel" and "supervisorRestarted" in restarted, restarted
    assert restarted["supervisorRestarted"]["previous_server_id"] == first.doc["server_id"]
    assert restart_seq is not None and restart_seq > before
    assert no_seq is None and lost["kind"] == "kernel", lost
    assert lost["framesLost"]["first"] == before + 1
    assert before < lost["framesLost"]["last"] < restart_seq
    later = [s for s, _ in tracker.items[2:]]
    assert later and all(s is not None and s > restart_seq for s in later)
    assert later == list(range(restart_seq + 1, restart_seq + 1 + len(later)))
    assert tracker.violations == []
    assert indices([f for _, f in tracker.items]) == list(range(100, 110))


# ---- notices, acks, bounds -----------------------------------------------------------------


async def test_an_evicted_resuming_client_is_told_without_a_seq(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(argv=mini_argv("flood"))
    assert (await daemon.start(session_id)).status_code == 200
    connect = daemon_connect(daemon, session_id)
    tracker = ResumeTracker(keep=True)
    first, first_pending = await connect(0)
    await run_code(first, first_pending, "3", tracker)

    second, pending = await connect(tracker.processed)
    # The first client gets what it had not read yet and the notice, then the close.
    rest = list(first_pending)
    with trio.fail_after(30):
        while not any('"clientDisconnected"' in t for t in rest):
            texts = await first.receive()
            assert texts is not None, rest
            rest += texts
    await trio.aclose_forcefully(first.stream)
    notices = [t for t in rest if '"clientDisconnected"' in t]
    assert len(notices) == 1 and seq_of(notices[0]) is None, notices
    assert json.loads(notices[0])["kind"] == "kernel"
    tracker.discarded(rest)

    # The second carries on from where the first stopped processing.
    await run_code(second, pending, "2", tracker)
    await second.close_clean()
    assert tracker.violations == [] and tracker.lost_ranges == []
    assert indices([f for _, f in tracker.items]) == list(range(5))


async def test_an_ack_on_a_plain_connection_is_ignored(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(argv=mini_argv("flood"))
    assert (await daemon.start(session_id)).status_code == 200
    url = urlsplit(daemon.base)
    assert url.hostname and url.port
    pending: list[str] = []
    ws = await ResumeSocket.open_tcp(url.hostname, url.port, channels_target(session_id, None),
                                     TOKEN, pending)
    await ws.ack(10**6)
    await ws.send_text('{"kind":"ack","seq":"not a number"}')
    texts = await run_code(ws, pending, "4")
    texts += await run_code(ws, pending, "1")
    await ws.close_clean()
    assert all(t.startswith('{"kind":') for t in texts)
    assert indices([json.loads(t) for t in texts]) == list(range(5))


async def test_resuming_beyond_the_newest_frame_resends_nothing(daemon: RunningDaemon) -> None:
    session_id = await daemon.create(argv=mini_argv("flood"))
    assert (await daemon.start(session_id)).status_code == 200
    connect = daemon_connect(daemon, session_id)
    ws, pending = await connect(0)
    tracker = ResumeTracker(keep=True)
    await run_code(ws, pending, "3", tracker)
    await ws.close_clean()  # nothing acknowledged

    ws, pending = await connect(tracker.processed + 1000)
    texts = await run_code(ws, pending, "2")
    # An ack beyond what was sent is "everything sent so far".
    await ws.ack(2**62)
    await ws.close_clean()
    seqs = [seq_of(t) for t in texts]
    assert None not in seqs
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs[0] > tracker.processed
    assert indices([json.loads(t) for t in texts]) == [3, 4]

    # Resuming from the last frame processed: that ack released whatever had been sent after
    # it (the session's status event follows the kernel's idle), so that much is reported
    # lost, and nothing comes twice.
    ws, pending = await connect(seqs[-1])
    tracker = ResumeTracker(keep=True, processed=seqs[-1], max_seen=seqs[-1], next_index=5)
    await run_code(ws, pending, "1", tracker)
    await ws.close_clean()
    assert tracker.violations == [] and tracker.duplicates == 0
    assert all(a == seqs[-1] + 1 for a, _ in tracker.lost_ranges)
    assert indices([f for _, f in tracker.items]) == [5]
