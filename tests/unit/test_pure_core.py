"""Table tests of the pure session core: state machine, execution queue, outbox."""

from __future__ import annotations

import pytest

from kallichore_trio.core.outbox import Outbox
from kallichore_trio.core.queue import ExecutionQueue, HeldMessages, QueueFull
from kallichore_trio.core.relay import status_verdict
from kallichore_trio.core.state import SessionState
from kallichore_trio.wire import ClientMessage


def request(msg_id: str) -> ClientMessage:
    return ClientMessage(msg_id=msg_id, msg_type="execute_request", parent=None,
                         channel="shell", content={"code": "1"}, metadata={})


# ---- state ----------------------------------------------------------------------------


def test_a_new_session_is_idle_and_setting_the_same_status_is_not_a_change() -> None:
    state = SessionState(idle_since=0.0)
    assert state.status == "idle"
    assert state.set("idle", 5.0) is False
    assert state.idle_seconds(7.0) == 7


@pytest.mark.parametrize(
    ("new", "idle_since", "busy_since"),
    [("busy", None, 10.0), ("idle", 10.0, None), ("exited", 10.0, None),
     ("starting", None, None), ("offline", None, None)],
)
def test_clocks_follow_the_status(new: str, idle_since: float | None,
                                  busy_since: float | None) -> None:
    state = SessionState(status="ready", idle_since=0.0)
    assert state.set(new, 10.0)  # type: ignore[arg-type]
    assert (state.idle_since, state.busy_since) == (idle_since, busy_since)


def test_offline_remembers_the_status_to_restore() -> None:
    state = SessionState(status="busy")
    state.set("offline", 1.0)
    assert state.before_offline == "busy"
    state.set("busy", 2.0)
    assert state.before_offline is None


# The status of a re-attached kernel, as the session drives it: `guess` is the re-attach
# (Session._on_started, shell not answered yet), `shell` our kernel_info_reply on shell,
# `busy`/`idle` an iopub status (its parent may be a cell the new daemon never sent).
REATTACHED = [
    # An idle kernel: the shell answers, the guess is corrected.
    (["guess", "shell"], ["busy", "idle"]),
    # The old cell ends first (its idle), then our request is answered: idle once.
    (["guess", "idle", "shell"], ["busy", "idle"]),
    # The old cell ends, a client's cell starts (busy) before our shell answer is read: the
    # late answer must not make the running cell's session idle.
    (["guess", "idle", "busy", "shell"], ["busy", "idle", "busy"]),
    # A status the kernel published replaces the guess even when it says busy too.
    (["guess", "busy", "shell"], ["busy"]),
    (["guess", "busy", "shell", "idle"], ["busy", "idle"]),
    # Not re-attached: a shell answer changes nothing.
    (["busy", "shell"], ["busy"]),
    (["shell"], []),
]


@pytest.mark.parametrize(("events", "statuses"), REATTACHED)
def test_a_reattached_kernel_is_busy_until_it_says_otherwise(events: list[str],
                                                            statuses: list[str]) -> None:
    state = SessionState(status="starting")
    changes: list[str] = []
    for now, event in enumerate(events):
        if event == "guess":
            changed = state.set("busy", now, guess=True)
        elif event == "shell":
            due = state.after_shell_answer()
            changed = due is not None and state.set(due, now)
        else:
            verdict = status_verdict({"execution_state": event}, "execute_request")
            assert verdict.status is not None
            changed = state.set(verdict.status, now)
        if changed:
            changes.append(state.status)
    assert changes == statuses
    assert state.busy_guessed is (events[-1] == "guess")


def test_the_idle_of_a_cell_the_daemon_never_sent_ends_nothing_in_the_queue() -> None:
    queue = ExecutionQueue()
    queue.submit(request("client-cell"))
    assert queue.finished("old-daemons-cell") is None
    assert queue.active is not None and queue.active.msg_id == "client-cell"


# ---- execution queue ------------------------------------------------------------------


def test_the_first_request_runs_and_the_next_waits() -> None:
    queue = ExecutionQueue()
    assert queue.submit(request("a")) is True
    assert queue.submit(request("b")) is False
    body = queue.to_dict()
    assert body["active"]["header"]["msg_id"] == "a"
    assert (body["length"], [p["header"]["msg_id"] for p in body["pending"]]) == (1, ["b"])


def test_only_the_active_request_ending_releases_the_next() -> None:
    queue = ExecutionQueue()
    for msg_id in "abc":
        queue.submit(request(msg_id))
    assert queue.finished("some-comm-msg") is None
    assert queue.finished("a").msg_id == "b"  # type: ignore[union-attr]
    assert queue.finished("a") is None  # a's idle after its reply: nothing more
    assert queue.finished("b").msg_id == "c"  # type: ignore[union-attr]
    assert queue.finished("c") is None
    assert queue.to_dict() == {"length": 0, "pending": []}


def test_clear_drops_active_and_pending() -> None:
    queue = ExecutionQueue()
    queue.submit(request("a"))
    queue.submit(request("b"))
    assert [m.msg_id for m in queue.clear()] == ["a", "b"]
    assert queue.submit(request("c")) is True


def test_the_queue_is_bounded() -> None:
    queue = ExecutionQueue(capacity=2)
    for msg_id in "abc":
        queue.submit(request(msg_id))
    with pytest.raises(QueueFull):
        queue.submit(request("d"))


# ---- outbox ---------------------------------------------------------------------------


def test_frames_come_out_in_order_and_ack_releases_them() -> None:
    outbox = Outbox(max_frames=10, max_bytes=1000)
    seqs = [outbox.append(t) for t in ("a", "b", "c")]
    assert seqs == [1, 2, 3]
    assert outbox.read().frames == [(1, "a"), (2, "b"), (3, "c")]
    outbox.ack(2)
    assert outbox.read().frames == [(3, "c")]
    assert outbox.statistics().bytes == 1


def test_overflow_drops_the_oldest_droppable_frame_and_counts_it() -> None:
    outbox = Outbox(max_frames=3, max_bytes=1000)
    outbox.append("status-1")
    outbox.append("stream-1", droppable=True)
    outbox.append("status-2")
    outbox.append("stream-2", droppable=True)
    batch = outbox.read()
    assert [t for _, t in batch.frames] == ["status-1", "status-2", "stream-2"]
    assert batch.missed == 1
    assert outbox.read().missed == 0  # each drop is reported once


def test_essential_frames_are_kept_up_to_twice_the_bound() -> None:
    outbox = Outbox(max_frames=2, max_bytes=1000)
    for i in range(4):
        outbox.append(f"status-{i}")
    assert len(outbox) == 4
    outbox.append("status-4")
    assert [t for _, t in outbox.read().frames] == [f"status-{i}" for i in range(1, 5)]
    stats = outbox.statistics()
    assert (stats.dropped, stats.dropped_essential) == (1, 1)


def test_the_byte_bound_holds() -> None:
    outbox = Outbox(max_frames=1000, max_bytes=10)
    for _ in range(20):
        outbox.append("12345", droppable=True)
    assert outbox.statistics().bytes <= 10


def test_acked_droppable_frames_are_not_dropped_twice() -> None:
    outbox = Outbox(max_frames=2, max_bytes=1000)
    outbox.append("s1", droppable=True)
    outbox.ack(1)
    outbox.append("s2", droppable=True)
    outbox.append("s3", droppable=True)
    outbox.append("s4", droppable=True)
    assert [t for _, t in outbox.read().frames] == ["s3", "s4"]
    assert outbox.statistics().dropped == 1


def test_a_read_stops_at_the_byte_budget_but_always_returns_one_frame() -> None:
    outbox = Outbox(max_frames=10, max_bytes=10_000)
    for text in ("a" * 300, "b" * 300, "c" * 300):
        outbox.append(text)
    assert [seq for seq, _ in outbox.read(max_bytes=500).frames] == [1, 2]
    assert [seq for seq, _ in outbox.read(max_bytes=10).frames] == [1]
    assert [seq for seq, _ in outbox.read(limit=2, max_bytes=10_000).frames] == [1, 2]


def test_can_wait_unless_an_urgent_frame_is_pending() -> None:
    outbox = Outbox(max_frames=10, max_bytes=10_000)
    assert outbox.can_wait  # nothing pending
    outbox.append("stream", droppable=True)
    assert outbox.can_wait
    status = outbox.append("status")
    assert not outbox.can_wait
    outbox.ack(status)
    assert outbox.can_wait
    outbox.append("stream", droppable=True)
    assert outbox.can_wait


@pytest.mark.parametrize(
    ("droppable", "urgent", "can_wait"),
    [(True, None, True), (False, None, False), (True, True, False), (False, False, True)],
)
def test_urgency_defaults_to_not_droppable_and_can_be_chosen(
    droppable: bool, urgent: bool | None, can_wait: bool
) -> None:
    outbox = Outbox(max_frames=10, max_bytes=10_000)
    outbox.append("stream", droppable=True)
    outbox.append("frame", droppable=droppable, urgent=urgent)
    assert outbox.can_wait is can_wait


@pytest.mark.parametrize(
    ("status", "before_offline", "alive", "change"),
    [
        ("offline", "busy", True, ("busy", "heartbeat detected after offline")),
        ("offline", None, True, ("idle", "heartbeat detected after offline")),
        ("idle", None, False, ("offline", "lost heartbeat")),
        ("ready", None, False, ("offline", "lost heartbeat")),
        # A busy kernel may miss beats; a starting or exited one is not watched for them.
        ("busy", None, False, None),
        ("starting", None, False, None),
        ("exited", None, False, None),
        ("offline", "idle", False, None),
        ("idle", None, True, None),
        ("busy", None, True, None),
    ],
)
def test_what_a_heartbeat_result_changes(status: str, before_offline: str | None, alive: bool,
                                         change: tuple[str, str] | None) -> None:
    state = SessionState(status=status, before_offline=before_offline)  # type: ignore[arg-type]
    assert state.after_heartbeat(alive) == change


def test_held_messages_keep_their_order_and_drop_the_oldest_past_the_limit() -> None:
    held = HeldMessages(limit=2)
    a, b, c = request("a"), request("b"), request("c")
    assert not held
    assert held.hold(a) is None and held.hold(b) is None
    assert held.hold(c) is a
    assert len(held) == 2
    assert [held.pop(), held.pop()] == [b, c]
    assert not held
