"""The client's side of the resume protocol, sans-IO (kallichore_trio/client/resume.py): seq
tracking, what each frame is, when to ack, when to give up reconnecting."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from kallichore_trio.client import messages as m
from kallichore_trio.client.resume import (
    ACK_AFTER_SECONDS,
    ACK_EVERY_FRAMES,
    MAX_DELAY,
    ReconnectPlan,
    ResumeState,
    Verdict,
    ack_frame,
    retryable_refusal,
    take_seq,
)

D, DUP, H = Verdict.DELIVER, Verdict.DUPLICATE, Verdict.HISTORY


def jupyter() -> dict[str, Any]:
    return {"kind": "jupyter", "header": {"msg_id": "a", "msg_type": "stream"}}


def status() -> dict[str, Any]:
    return {"kind": "kernel", "status": {"status": "idle"}}


def lost(first: int, last: int) -> dict[str, Any]:
    return {"kind": "kernel", "framesLost": {"first": first, "last": last}}


def restarted() -> dict[str, Any]:
    return {"kind": "kernel", "supervisorRestarted": {"previous_server_id": "x", "gap_ms": 5}}


def evicted() -> dict[str, Any]:
    return {"kind": "kernel", "clientDisconnected": "Another client is connected"}


@pytest.mark.parametrize(("frame", "seq", "left"), [
    ({"seq": 17, "kind": "jupyter"}, 17, {"kind": "jupyter"}),
    ({"kind": "jupyter"}, None, {"kind": "jupyter"}),
    ({"seq": 2**63 - 1, "kind": "x"}, 2**63 - 1, {"kind": "x"}),
    ({"seq": 0, "kind": "x"}, None, {"kind": "x"}),
    ({"seq": -1, "kind": "x"}, None, {"kind": "x"}),
    ({"seq": True, "kind": "x"}, None, {"kind": "x"}),
    ({"seq": "3", "kind": "x"}, None, {"kind": "x"}),
    ({"seq": 1.0, "kind": "x"}, None, {"kind": "x"}),
])
def test_take_seq_removes_the_field_and_keeps_only_valid_numbers(
        frame: dict[str, Any], seq: int | None, left: dict[str, Any]) -> None:
    assert take_seq(frame) == seq
    assert frame == left


# Each row: the frames in order as (seq, frame), the verdicts, then (last, numbered,
# resumable) at the end.
SEQUENCES = {
    "numbered frames in order": (
        [(1, jupyter()), (2, status()), (3, jupyter())], [D, D, D], (3, True, True)),
    "a daemon without the protocol": (
        [(None, jupyter()), (None, status())], [D, D], (0, False, False)),
    "duplicates after a resume are dropped": (
        [(1, jupyter()), (2, jupyter()), (2, jupyter()), (1, status()), (3, jupyter())],
        [D, D, DUP, DUP, D], (3, True, True)),
    "a loss notice moves the resume point past the range": (
        [(1, jupyter()), (None, lost(2, 40)), (41, status())], [D, D, D], (41, True, True)),
    "a loss below what was processed moves nothing": (
        [(1, jupyter()), (5, jupyter()), (None, lost(2, 4))], [D, D, D], (5, True, True)),
    "losses before the first frame of an attach are history": (
        [(None, lost(1, 99)), (100, status()), (101, jupyter())], [H, D, D],
        (101, True, True)),
    "a crash before the attach: supervisorRestarted first, then the gap, both history": (
        [(65537, restarted()), (None, lost(1, 65536)), (65538, status())], [H, H, D],
        (65538, True, True)),
    "a crash while attached: both are losses": (
        [(7, jupyter()), (65537, restarted()), (None, lost(8, 65536)), (65538, jupyter())],
        [D, D, D, D], (65538, True, True)),
    "an eviction notice ends resuming": (
        [(1, jupyter()), (None, evicted())], [D, D], (1, True, False)),
    "a malformed loss notice is routed and changes nothing": (
        [(3, jupyter()), (None, {"kind": "kernel", "framesLost": "x"})], [D, D],
        (3, True, True)),
}


@pytest.mark.parametrize(("frames", "verdicts", "end"), list(SEQUENCES.values()),
                         ids=list(SEQUENCES))
def test_frames_are_sorted_and_tracked(frames: list[tuple[int | None, dict[str, Any]]],
                                       verdicts: list[Verdict],
                                       end: tuple[int, bool, bool]) -> None:
    state = ResumeState()
    assert [state.on_frame(seq, frame, 0.0) for seq, frame in frames] == verdicts
    assert (state.last, state.numbered, state.resumable) == end


def test_the_resume_query_says_the_last_frame_processed() -> None:
    state = ResumeState()
    assert state.query() == "resume=0"
    state.on_frame(12, jupyter(), 0.0)
    assert state.query() == "resume=12"


def test_acks_come_after_a_tenth_of_a_second_or_enough_frames() -> None:
    state = ResumeState()
    state.connected()
    assert state.ack_at() == math.inf and state.ack_due(0.0) is None
    state.on_frame(1, jupyter(), 10.0)
    assert state.take_wake() and not state.take_wake()  # the timer starts: once
    assert state.ack_at() == 10.0 + ACK_AFTER_SECONDS
    assert state.ack_due(10.05) is None
    state.on_frame(2, jupyter(), 10.06)
    assert not state.take_wake()
    assert state.ack_due(10.0 + ACK_AFTER_SECONDS) == 2
    state.ack_sent(2, 10.1)
    assert state.ack_at() == math.inf
    for seq in range(3, 3 + ACK_EVERY_FRAMES):
        state.on_frame(seq, jupyter(), 11.0)
    assert state.take_wake()  # the first frame and the count: one wake is enough
    assert state.ack_at() == -math.inf and state.ack_due(11.0) == 2 + ACK_EVERY_FRAMES


def test_frames_processed_while_an_ack_was_on_its_way_wait_for_the_next() -> None:
    state = ResumeState()
    for seq in (1, 2, 3):
        state.on_frame(seq, jupyter(), 0.0)
    state.ack_sent(2, 5.0)  # frame 3 came during the send
    assert state.ack_at() == 5.0 + ACK_AFTER_SECONDS
    assert state.ack_due(6.0) == 3


def test_a_new_connection_has_nothing_to_ack_and_a_daemon_without_seq_gets_no_ack() -> None:
    state = ResumeState()
    for seq in (1, 2):
        state.on_frame(seq, jupyter(), 0.0)
    state.connected()  # resume=2 released up to 2
    assert state.ack_due(100.0) is None and state.final_ack() is None
    plain = ResumeState()
    plain.on_frame(None, jupyter(), 0.0)
    assert plain.ack_due(100.0) is None and plain.final_ack() is None


def test_the_final_ack_covers_what_was_processed() -> None:
    state = ResumeState()
    state.on_frame(4, jupyter(), 0.0)
    assert state.final_ack() == 4
    state.ack_sent(4, 0.0)
    assert state.final_ack() is None
    assert json.loads(ack_frame(4)) == {"kind": "ack", "seq": 4}


def test_reconnect_attempts_start_at_once_back_off_and_stop_at_the_deadline() -> None:
    plan = ReconnectPlan(deadline=30.0)
    delays = []
    now = 0.0
    while (delay := plan.next_delay(now)) is not None:
        delays.append(delay)
        now += delay
    assert delays[:4] == [0.0, 0.05, 0.1, 0.2]
    assert max(delays) == MAX_DELAY
    assert now <= 30.0 and plan.attempts == len(delays)
    assert ReconnectPlan(deadline=100.0, max_attempts=3).next_delay(0.0) == 0.0
    bounded = ReconnectPlan(deadline=1000.0, max_attempts=3)
    assert [bounded.next_delay(0.0) for _ in range(4)] == [0.0, 0.05, 0.1, None]
    assert ReconnectPlan(deadline=1.0).next_delay(1.0) is None


@pytest.mark.parametrize(("status", "retry"), [
    (400, False), (401, False), (403, False), (404, False), (500, True), (503, True)])
def test_which_refusals_are_worth_another_attempt(status: int, retry: bool) -> None:
    assert retryable_refusal(status) is retry


@pytest.mark.parametrize(("frame", "expected"), [
    ('{"kind":"kernel","framesLost":{"first":3,"last":9}}',
     m.FramesLost("framesLost", 3, 9)),
    ('{"kind":"kernel","supervisorRestarted":{"previous_server_id":"s1","gap_ms":1200}}',
     m.SupervisorRestarted("supervisorRestarted", "s1", 1200)),
    ('{"kind":"kernel","supervisorRestarted":{}}',
     m.SupervisorRestarted("supervisorRestarted", None, None)),
    ('{"kind":"kernel","framesLost":{"first":"3","last":9}}',
     m.OtherEvent("framesLost", {"first": "3", "last": 9})),
])
def test_the_notices_are_typed_events(frame: str, expected: m.KernelEvent) -> None:
    assert m.parse_frame(frame) == expected


def test_a_numbered_frame_parses_once_its_seq_is_taken() -> None:
    obj = m.load_frame('{"seq":5,"kind":"kernel","status":{"status":"busy"}}')
    assert take_seq(obj) == 5
    assert m.parse_object(obj) == m.StatusEvent("status", "busy", None)


@pytest.mark.parametrize(("event", "text"), [
    (m.FramesLost("framesLost", 10, 19),
     "10 frames of the session's output were lost (numbers 10-19) while the connection was "
     "being resumed; what is shown may be incomplete"),
    (m.FramesLost("framesLost", 4, 4), "1 frame of the session's output was lost"),
    (m.SupervisorRestarted("supervisorRestarted", "s", 2500),
     "the daemon was restarted after 2500 ms without one; what the kernel sent meanwhile is "
     "lost"),
    (m.FramesLost("framesLost", 1, 99, history=True), None),
    (m.SupervisorRestarted("supervisorRestarted", "s", 1, history=True), None),
    (m.StatusEvent("status", "idle"), None),
])
def test_kc_says_what_was_lost_on_stderr(event: m.KernelEvent, text: str | None) -> None:
    import io

    from kallichore_trio.client.kc_output import Output, notice_text, print_notices

    said = notice_text(event)
    assert said == text if text is None else said is not None and said.startswith(text)
    out, err = io.StringIO(), io.StringIO()
    print_notices(Output(out, err, json=False, tty=False), "py")(event)
    assert out.getvalue() == ""
    assert err.getvalue() == ("" if said is None else f"kc: session py: {said}\n")
