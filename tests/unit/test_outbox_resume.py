"""Outbox.read_after: what a resuming client is sent (docs/durability.md, resume)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kallichore_trio import wire
from kallichore_trio.core.outbox import Lost, Outbox


def filled(spec: str, *, max_frames: int = 100, first_seq: int = 1) -> Outbox:
    """An outbox with one frame per letter: lower case droppable (stream), upper case kept
    (status); the text of each frame is its letter."""
    outbox = Outbox(max_frames=max_frames, max_bytes=1 << 20, first_seq=first_seq)
    for letter in spec:
        outbox.append(letter, droppable=letter.islower())
    return outbox


def shown(items: list) -> list:
    return [item if isinstance(item, Lost) else item[0] for item in items]


@pytest.mark.parametrize(
    ("cursor", "expected", "next_cursor"),
    [
        (0, [1, 2, 3, 4], 4),      # a fresh start: everything
        (2, [3, 4], 4),            # exactly the frames after the cursor
        (4, [], 4),                # nothing new
        (99, [], 4),               # a cursor beyond the newest frame: nothing to resend
    ],
)
def test_read_after_sends_exactly_the_frames_after_the_cursor(
    cursor: int, expected: list, next_cursor: int
) -> None:
    outbox = filled("aBcD")
    batch = outbox.read_after(cursor)
    assert shown(batch.items) == expected
    assert batch.cursor == next_cursor


def test_read_after_releases_nothing_and_ack_does() -> None:
    outbox = filled("abcd")
    outbox.read_after(0)
    assert len(outbox) == 4  # written is not acknowledged
    outbox.ack(2)
    assert shown(outbox.read_after(0).items) == [Lost(1, 2), 3, 4]


def test_shed_frames_become_lost_ranges_split_by_kept_statuses() -> None:
    # Bound 4: the oldest droppable frames go first; the statuses stay.
    outbox = filled("abCdeFgh", max_frames=4)
    # held: C F g h -> a b lost, d e lost
    assert shown(outbox.read_after(0).items) == [Lost(1, 2), 3, Lost(4, 5), 6, 7, 8]


def test_a_trailing_gap_is_reported_up_to_the_newest_frame() -> None:
    outbox = filled("abc")
    outbox.ack(3)
    batch = outbox.read_after(1)
    assert shown(batch.items) == [Lost(2, 3)]
    assert batch.cursor == 3


def test_a_long_read_is_cut_into_batches_that_continue_where_they_stopped() -> None:
    outbox = filled("a" * 10)
    first = outbox.read_after(0, limit=4)
    assert shown(first.items) == [1, 2, 3, 4]
    second = outbox.read_after(first.cursor, limit=4)
    assert shown(second.items) == [5, 6, 7, 8]
    assert shown(outbox.read_after(second.cursor, limit=4).items) == [9, 10]


def test_the_byte_budget_still_returns_one_frame() -> None:
    outbox = Outbox(max_frames=10, max_bytes=1 << 20)
    outbox.append("x" * 1000)
    outbox.append("y")
    assert shown(outbox.read_after(0, max_bytes=10).items) == [1]


def test_a_successors_outbox_reports_the_predecessors_numbers_after_its_first_frame() -> None:
    # A re-attached session numbers from above its record's reservation; its first frame is
    # supervisorRestarted, which a client from before the crash must see first.
    outbox = filled("RaB", first_seq=1001)
    assert shown(outbox.read_after(640).items) == [1001, Lost(641, 1000), 1002, 1003]
    assert shown(outbox.read_after(1000).items) == [1001, 1002, 1003]


def test_a_predecessors_range_comes_first_when_the_first_frame_was_released() -> None:
    outbox = filled("RaB", first_seq=1001)
    outbox.ack(1001)
    assert shown(outbox.read_after(640).items) == [Lost(641, 1001), 1002, 1003]


def test_unacknowledged_frames_count_against_the_bound() -> None:
    outbox = filled("abcdef", max_frames=4)
    assert len(outbox) == 4
    assert shown(outbox.read_after(0).items) == [Lost(1, 2), 3, 4, 5, 6]


# ---- the wire side of resume --------------------------------------------------------------

@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/", None),
        (b"/?other=1", None),
        (b"/?resume=0", 0),
        (b"/x?a=b&resume=17", 17),
        (f"/?resume={wire.MAX_SEQ}".encode(), wire.MAX_SEQ),
    ],
)
def test_resume_values_that_are_accepted(target: bytes, expected: int | None) -> None:
    assert wire.resume_from_target(target) == expected


@pytest.mark.parametrize(
    "value", ["", "-1", "+1", "abc", "1.5", " 1", "0x10", str(wire.MAX_SEQ + 1), "9" * 40, "١٢"]
)
def test_resume_values_that_are_refused(value: str) -> None:
    with pytest.raises(wire.ResumeError, match="resume must be a non-negative integer"):
        wire.parse_resume([value])


def test_resume_given_twice_is_refused() -> None:
    with pytest.raises(wire.ResumeError, match="resume must be given once"):
        wire.resume_from_target(b"/?resume=1&resume=2")


def test_an_ack_frame_is_parsed() -> None:
    assert wire.parse_client_frame('{"kind":"ack","seq":12}') == wire.Ack(12)


@pytest.mark.parametrize("seq", ["12", -1, 1.0, True, None, 2**64])
def test_a_bad_ack_is_a_specific_error(seq: object) -> None:
    with pytest.raises(wire.ClientFrameError, match="an ack needs a non-negative integer"):
        wire.parse_client_frame(json.dumps({"kind": "ack", "seq": seq}))


def test_seq_is_the_first_field_and_the_rest_is_unchanged() -> None:
    frame = wire.status_event("idle", None)
    stamped = wire.with_seq(5, frame)
    assert stamped.startswith('{"seq":5,"kind":"kernel"')
    parsed = json.loads(stamped)
    assert parsed.pop("seq") == 5
    assert parsed == json.loads(frame)


def test_frames_lost_event() -> None:
    assert json.loads(wire.frames_lost_event(3, 9)) == {
        "kind": "kernel", "framesLost": {"first": 3, "last": 9}}


# ---- the three tiers ------------------------------------------------------------------------

def test_kept_frames_outlive_ordinary_ones_and_go_only_past_four_times_the_bound() -> None:
    outbox = Outbox(max_frames=2, max_bytes=1 << 20)
    outbox.append("status-1", kept=True)
    for i in range(4):
        outbox.append(f"display-{i}")
    # Past twice the bound the oldest ordinary frame goes, not the older status.
    assert [t for _, t in outbox.read().frames] == ["status-1", "display-1", "display-2",
                                                    "display-3"]
    stats = outbox.statistics()
    assert (stats.dropped, stats.dropped_essential, stats.dropped_kept) == (1, 1, 0)


def test_kept_frames_alone_are_held_up_to_four_times_the_bound() -> None:
    outbox = Outbox(max_frames=2, max_bytes=1 << 20)
    for i in range(8):
        outbox.append(f"status-{i}", kept=True)
    assert len(outbox) == 8
    outbox.append("status-8", kept=True)
    assert outbox.read().frames[0] == (2, "status-1")
    assert outbox.statistics().dropped_kept == 1


def test_droppable_then_ordinary_then_kept() -> None:
    outbox = Outbox(max_frames=3, max_bytes=1 << 20)
    outbox.append("S", kept=True)
    outbox.append("o")           # ordinary
    outbox.append("d", droppable=True)
    outbox.append("S2", kept=True)
    assert [t for _, t in outbox.read().frames] == ["S", "o", "S2"]  # the droppable went
    for i in range(4):
        outbox.append(f"K{i}", kept=True)
    # 7 frames: over twice the bound (3) -> the ordinary frame goes, no kept one.
    assert [t for _, t in outbox.read().frames] == ["S", "S2", "K0", "K1", "K2", "K3"]


# ---- generated: whatever happened, a resuming reader accounts for every number once --------

tiers = st.sampled_from(["droppable", "ordinary", "kept"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), tiers, st.integers(1, 40)),
        st.tuples(st.just("ack"), st.integers(0, 200)),
    ),
    max_size=200,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(operations, st.integers(0, 220), st.integers(1, 8), st.integers(1, 300))
def test_reading_after_any_cursor_covers_every_number_once_in_order(
    ops: list, cursor: int, limit: int, first_seq: int
) -> None:
    outbox = Outbox(max_frames=6, max_bytes=120, first_seq=first_seq)
    texts: dict[int, str] = {}
    for op in ops:
        if op[0] == "append":
            _, tier, size = op
            text = f"{len(texts):03d}" + "x" * size
            seq = outbox.append(text, droppable=tier == "droppable", kept=tier == "kept")
            texts[seq] = text
        else:
            outbox.ack(first_seq + op[1])
    cursor = max(0, cursor + first_seq - 100)  # below, inside and above its numbers
    held = dict(outbox.read(limit=10_000, max_bytes=1 << 30).frames)
    covered: list[int] = []
    frames: list[int] = []
    kinds: list[str] = []
    at = cursor
    for _ in range(10_000):
        batch = outbox.read_after(at, limit=limit)
        if not batch.items:
            break
        for item in batch.items:
            if isinstance(item, Lost):
                assert item.first <= item.last
                covered.extend(range(item.first, item.last + 1))
                kinds.append("lost")
            else:
                seq, text = item
                assert texts[seq] == text
                covered.append(seq)
                frames.append(seq)
                kinds.append("frame")
        at = batch.cursor
    start = max(min(cursor, outbox.last_seq), 0) + 1
    pred_first = first_seq if start < first_seq and first_seq in held else None
    expected = list(range(start, outbox.last_seq + 1))
    if pred_first is not None:  # the successor's first frame, then the predecessor's range
        expected.remove(pred_first)
        expected.insert(0, pred_first)
    assert covered == expected
    assert frames == [s for s in held if s > min(cursor, outbox.last_seq)]
    assert len(outbox) == len(held)  # reading released nothing
    assert ("lost", "lost") not in itertools.pairwise(kinds)  # ranges are whole
