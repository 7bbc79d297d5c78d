"""Byte-exact tests of the sans-IO wire layer (kallichore_trio.wire)."""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import re
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from kallichore_trio.wire import (
    DELIMITER,
    ClientFrameError,
    ClientMessage,
    InvalidSignature,
    KernelMessage,
    MalformedHeader,
    MissingDelimiter,
    Signer,
    WireError,
    build_frames,
    client_disconnected_event,
    dumps,
    execution_queued_event,
    execution_requested_event,
    exited_event,
    format_date,
    format_timestamp,
    handshake_completed_event,
    kernel_event_frame,
    new_msg_id,
    now_date,
    output_event,
    parse_client_frame,
    parse_kernel_frames,
    relay_frame,
    resource_usage_event,
    status_event,
    working_dir_changed_event,
)

KEY = b"0123456789abcdef0123456789abcdef"
DATE = "2026-03-02T16:06:01.123Z"


def hmac_hex(key: bytes, *parts: bytes) -> bytes:
    """Independent reference: one HMAC over the concatenation of the signed frames."""
    return hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest().encode()


def kernel_header(msg_id: str = "k1", msg_type: str = "status") -> bytes:
    return (
        f'{{"msg_id":"{msg_id}","msg_type":"{msg_type}","session":"ks","username":"kernel",'
        f'"date":"{DATE}","version":"5.3"}}'
    ).encode()


def kernel_frames(
    *,
    key: bytes = KEY,
    header: bytes | None = None,
    parent: bytes = b"{}",
    metadata: bytes = b"{}",
    content: bytes = b'{"execution_state":"busy"}',
    buffers: tuple[bytes, ...] = (),
    identities: tuple[bytes, ...] = (),
    signature: bytes | None = None,
) -> list[bytes]:
    header = kernel_header() if header is None else header
    if signature is None:
        signature = hmac_hex(key, header, parent, metadata, content) if key else b""
    return [*identities, DELIMITER, signature, header, parent, metadata, content, *buffers]


# --- isolation -----------------------------------------------------------------------------


def test_wire_package_imports_only_stdlib_and_attrs() -> None:
    wire_dir = Path(__file__).parents[2] / "kallichore_trio" / "wire"
    allowed = set(sys.stdlib_module_names) | {"attrs", "kallichore_trio"}
    for source in wire_dir.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{source.name} imports {name}"
                if name.startswith("kallichore_trio"):
                    assert name.startswith("kallichore_trio.wire"), f"{source.name}: {name}"


# --- Signer ---------------------------------------------------------------------------------


def test_signer_matches_independent_hmac() -> None:
    parts = (b'{"a":1}', b"{}", b"{}", b'{"code":"1+1"}')
    assert Signer(KEY).sign(*parts) == hmac_hex(KEY, *parts)
    assert re.fullmatch(rb"[0-9a-f]{64}", Signer(KEY).sign(*parts))


def test_signer_reuse_is_stateless() -> None:
    signer = Signer(KEY)
    first = signer.sign(b"h", b"p", b"m", b"c")
    signer.sign(b"other", b"", b"", b"")
    assert signer.sign(b"h", b"p", b"m", b"c") == first


def test_signer_verify() -> None:
    signer = Signer(KEY)
    good = signer.sign(b"h", b"p", b"m", b"c")
    assert signer.verify(good, b"h", b"p", b"m", b"c")
    assert not signer.verify(good, b"h", b"p", b"m", b"C")
    assert not signer.verify(b"0" * 64, b"h", b"p", b"m", b"c")
    assert signer.verify(b"", b"h", b"p", b"m", b"c")  # empty signature: accepted


def test_empty_key_means_unsigned() -> None:
    signer = Signer(b"")
    assert signer.sign(b"h", b"p", b"m", b"c") == b""
    assert signer.verify(b"anything", b"h", b"p", b"m", b"c")


# --- build_frames: header rebuild (docs/protocol.md §5.3) ---------------------------

EXPECTED_HEADER = (
    b'{"msg_id":"abc123","msg_type":"execute_request","session":"sess-1",'
    b'"username":"alice","date":"2026-03-02T16:06:01.123Z","version":"5.3"}'
)
EXPECTED_PARENT = (
    b'{"msg_id":"par9","msg_type":"comm_open","session":"sess-1",'
    b'"username":"alice","date":"2026-03-02T16:06:01.123Z","version":"5.3"}'
)
CONTENT = b'{"code":"1+1","silent":false}'
METADATA = b'{"cellId":"x"}'


def build(**overrides: Any) -> list[bytes]:
    args: dict[str, Any] = {
        "msg_id": "abc123",
        "msg_type": "execute_request",
        "parent": None,
        "metadata": METADATA,
        "content": CONTENT,
        "buffers": (),
        "session": "sess-1",
        "username": "alice",
        "version": "5.3",
        "date": DATE,
        "signer": Signer(KEY),
        "identity": b"sess-1",
    }
    args.update(overrides)
    return build_frames(**args)


@pytest.mark.parametrize(
    ("parent", "expected_parent"),
    [(None, b"{}"), (("par9", "comm_open"), EXPECTED_PARENT)],
    ids=["no-parent", "parent"],
)
def test_build_frames_bytes_exact(parent: Any, expected_parent: bytes) -> None:
    frames = build(parent=parent)
    sig = hmac_hex(KEY, EXPECTED_HEADER, expected_parent, METADATA, CONTENT)
    assert frames == [
        b"sess-1",
        b"<IDS|MSG>",
        sig,
        EXPECTED_HEADER,
        expected_parent,
        METADATA,
        CONTENT,
    ]


@pytest.mark.parametrize(
    ("channel", "identity", "first_frames"),
    [
        ("shell", b"sess-1", [b"sess-1", DELIMITER]),
        ("stdin", b"sess-1", [b"sess-1", DELIMITER]),
        ("control", None, [DELIMITER]),
    ],
)
def test_identity_frame_per_channel(
    channel: str, identity: bytes | None, first_frames: list[bytes]
) -> None:
    frames = build(identity=identity)
    assert frames[: len(first_frames)] == first_frames
    assert frames.count(DELIMITER) == 1
    assert len(frames) == len(first_frames) + 5


def test_build_frames_buffers_are_appended_unsigned() -> None:
    bufs = (b"\x00\x01binary", b"", b"\xff" * 10)
    with_bufs = build(buffers=bufs)
    without = build()
    assert with_bufs[: len(without)] == without  # same signature: buffers not covered
    assert tuple(with_bufs[len(without) :]) == bufs


def test_build_frames_unsigned_when_no_key() -> None:
    frames = build(signer=Signer(b""), identity=None)
    assert frames[1] == b""


def test_build_frames_non_ascii_header_utf8() -> None:
    frames = build(username="jöhn ✓", identity=None)
    assert b'"username":"j\xc3\xb6hn \xe2\x9c\x93"' in frames[2]


# --- parse_kernel_frames --------------------------------------------------------------------


def test_round_trip_build_then_parse() -> None:
    frames = build(parent=("par9", "comm_open"), buffers=(b"B1", b"B2"))
    msg = parse_kernel_frames(frames, Signer(KEY))
    assert msg.identities == (b"sess-1",)
    assert msg.header == json.loads(EXPECTED_HEADER)
    assert msg.parent_header == json.loads(EXPECTED_PARENT)
    assert (msg.msg_id, msg.msg_type) == ("abc123", "execute_request")
    assert (msg.parent_msg_id, msg.parent_msg_type) == ("par9", "comm_open")
    assert msg.metadata == METADATA
    assert msg.content == CONTENT
    assert msg.buffers == (b"B1", b"B2")
    assert msg.content_json() == {"code": "1+1", "silent": False}


def test_round_trip_control_no_identity() -> None:
    msg = parse_kernel_frames(build(identity=None), Signer(KEY))
    assert msg.identities == ()
    assert msg.parent_header is None
    assert msg.parent_msg_id is None and msg.parent_msg_type is None


def test_multiple_identities_before_delimiter() -> None:
    msg = parse_kernel_frames(kernel_frames(identities=(b"a", b"b")), Signer(KEY))
    assert msg.identities == (b"a", b"b")


def test_first_delimiter_wins() -> None:
    # A DELIMITER-valued buffer after the content must not confuse the split.
    frames = kernel_frames(buffers=(DELIMITER,))
    msg = parse_kernel_frames(frames, Signer(KEY))
    assert msg.buffers == (DELIMITER,)


def test_tampered_signature_rejected() -> None:
    frames = kernel_frames()
    frames[1] = bytes(reversed(frames[1]))
    with pytest.raises(InvalidSignature):
        parse_kernel_frames(frames, Signer(KEY))


def test_tampered_content_rejected() -> None:
    frames = kernel_frames()
    frames[-1] = b'{"execution_state":"idle"}'
    with pytest.raises(InvalidSignature, match="signature"):
        parse_kernel_frames(frames, Signer(KEY))


def test_wrong_key_rejected() -> None:
    with pytest.raises(InvalidSignature):
        parse_kernel_frames(kernel_frames(key=b"other"), Signer(KEY))


def test_empty_signature_accepted() -> None:
    msg = parse_kernel_frames(kernel_frames(signature=b""), Signer(KEY))
    assert msg.msg_type == "status"


def test_buffers_unsigned_and_preserved() -> None:
    bufs = (b"\x00raw", b"", b"\xde\xad\xbe\xef")
    frames = kernel_frames(buffers=bufs)  # signature computed without buffers
    assert parse_kernel_frames(frames, Signer(KEY)).buffers == bufs


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"id", b"sig", kernel_header(), b"{}", b"{}", b"{}"],
        [b"<IDS|MSG2>", b"", kernel_header(), b"{}", b"{}", b"{}"],
        [DELIMITER, b"", kernel_header(), b"{}", b"{}"],  # content missing
        [b"id", DELIMITER],
    ],
    ids=["empty", "no-delimiter", "near-miss", "too-few", "nothing-after"],
)
def test_missing_delimiter_or_too_few_frames(frames: list[bytes]) -> None:
    with pytest.raises(MissingDelimiter):
        parse_kernel_frames(frames, Signer(KEY))


@pytest.mark.parametrize("parent", [b"{}", b"", b" {} ", b"null"])
def test_short_parent_is_none(parent: bytes) -> None:
    msg = parse_kernel_frames(kernel_frames(parent=parent), Signer(KEY))
    assert msg.parent_header is None


_FULL = json.loads(kernel_header())


@pytest.mark.parametrize("field", list(_FULL))
def test_header_missing_field_rejected(field: str) -> None:
    header = dict(_FULL)
    del header[field]
    with pytest.raises(MalformedHeader, match=field):
        parse_kernel_frames(kernel_frames(header=json.dumps(header).encode()), Signer(KEY))


@pytest.mark.parametrize(
    ("header", "parent"),
    [
        (b"not json", b"{}"),
        (b"[1,2,3]", b"{}"),
        (b"\xff\xfe{}", b"{}"),
        (json.dumps({**_FULL, "msg_id": 5}).encode(), b"{}"),
        (kernel_header(), b'{"msg_id":"p"}'),
        (kernel_header(), b'{"msg_type":"execute_request"}'),
        (kernel_header(), b"not json at all"),
        (kernel_header(), b"[1, 2, 3]"),
    ],
    ids=[
        "header-not-json",
        "header-array",
        "header-bad-utf8",
        "header-msg_id-int",
        "parent-no-type",
        "parent-no-id",
        "parent-not-json",
        "parent-array",
    ],
)
def test_malformed_header_rejected(header: bytes, parent: bytes) -> None:
    with pytest.raises(MalformedHeader):
        parse_kernel_frames(kernel_frames(header=header, parent=parent), Signer(KEY))


def test_wire_errors_share_a_base() -> None:
    for exc in (MissingDelimiter, InvalidSignature, MalformedHeader):
        assert issubclass(exc, WireError)


def test_metadata_and_content_left_raw() -> None:
    content = b'{ "b" : 1,\n "a": 2 }'  # odd spacing survives untouched
    msg = parse_kernel_frames(kernel_frames(content=content), Signer(KEY))
    assert msg.content == content


# --- format_date / new_msg_id / dumps -------------------------------------------------------


@pytest.mark.parametrize(
    ("dt", "expected"),
    [
        (datetime(2026, 3, 2, 16, 6, 1, 123456, tzinfo=UTC), "2026-03-02T16:06:01.123Z"),
        (datetime(2026, 3, 2, 16, 6, 1, tzinfo=UTC), "2026-03-02T16:06:01.000Z"),
        (datetime(2026, 3, 2, 16, 6, 1, 999999, tzinfo=UTC), "2026-03-02T16:06:01.999Z"),
        (
            datetime(2026, 3, 2, 18, 6, 1, 5000, tzinfo=timezone(timedelta(hours=2))),
            "2026-03-02T16:06:01.005Z",
        ),
    ],
)
def test_format_date(dt: datetime, expected: str) -> None:
    assert format_date(dt) == expected


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1772467561.123, "2026-03-02T16:06:01.123Z"),
        (1772467561.0, "2026-03-02T16:06:01.000Z"),
        (1772467561.9995, "2026-03-02T16:06:01.999Z"),  # truncated, never .1000
        (1772467562.25, "2026-03-02T16:06:02.250Z"),  # the next second: a new prefix
        (1772467561.5, "2026-03-02T16:06:01.500Z"),  # and back: the cache follows
        (0.0, "1970-01-01T00:00:00.000Z"),
    ],
)
def test_format_timestamp(t: float, expected: str) -> None:
    assert format_timestamp(t) == expected


def test_now_date_is_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = now_date()
    after = datetime.now(UTC)
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before <= parsed <= after
    assert format_date(parsed) == stamp


def test_format_date_rejects_naive() -> None:
    with pytest.raises(ValueError, match="timezone"):
        format_date(datetime(2026, 3, 2))


def test_new_msg_id_shape() -> None:
    ids = {new_msg_id() for _ in range(50)}
    assert all(re.fullmatch(r"[0-9a-f]{10}", i) for i in ids)
    assert len(ids) == 50


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"a": 1, "b": [1, 2]}, b'{"a":1,"b":[1,2]}'),
        ({"t": "héllo ✓"}, '{"t":"héllo ✓"}'.encode()),
        ({"s": "\ud800"}, b'{"s":"\\ud800"}'),  # lone surrogate: escaped, still valid
        (None, b"null"),
    ],
)
def test_dumps(obj: Any, expected: bytes) -> None:
    assert dumps(obj) == expected


# --- relay_frame (server -> client kind: jupyter) -------------------------------------------


def test_relay_frame_exact() -> None:
    msg = parse_kernel_frames(
        kernel_frames(
            header=kernel_header("out1", "stream"),
            parent=kernel_header("req1", "execute_request"),
            content='{"name":"stdout","text":"héllo ✓\\n"}'.encode(),
            metadata=b'{"m":[1,2]}',
            buffers=(b"\x00\x01\x02", b"hello"),
        ),
        Signer(KEY),
    )
    text = relay_frame(msg, "iopub")
    assert json.loads(text) == {
        "kind": "jupyter",
        "header": {"msg_id": "out1", "msg_type": "stream"},
        "parent_header": {"msg_id": "req1", "msg_type": "execute_request"},
        "channel": "iopub",
        "content": {"name": "stdout", "text": "héllo ✓\n"},
        "metadata": {"m": [1, 2]},
        "buffers": [base64.b64encode(b"\x00\x01\x02").decode(), "aGVsbG8="],
    }
    assert text.startswith('{"kind":"jupyter","header":')
    assert "héllo ✓" in text  # spliced raw, not re-escaped


@pytest.mark.parametrize("channel", ["shell", "iopub", "control", "stdin", 'odd"name'])
def test_relay_frame_no_parent_no_buffers(channel: str) -> None:
    msg = parse_kernel_frames(kernel_frames(), Signer(KEY))
    assert json.loads(relay_frame(msg, channel)) == {
        "kind": "jupyter",
        "header": {"msg_id": "k1", "msg_type": "status"},
        "parent_header": None,
        "channel": channel,
        "content": {"execution_state": "busy"},
        "metadata": {},
        "buffers": [],
    }


def test_relay_frame_empty_content_frames_stay_valid_json() -> None:
    msg = KernelMessage(
        identities=(),
        header=json.loads(kernel_header()),
        parent_header=None,
        metadata=b"",
        content=b"",
    )
    obj = json.loads(relay_frame(msg, "shell"))
    assert obj["content"] == {} and obj["metadata"] == {}


def test_relay_frame_header_ids_escaped() -> None:
    header = json.loads(kernel_header())
    header["msg_id"] = 'we"ird\\id'
    msg = KernelMessage(
        identities=(), header=header, parent_header=None, metadata=b"{}", content=b"{}"
    )
    assert json.loads(relay_frame(msg, "shell"))["header"]["msg_id"] == 'we"ird\\id'


# --- parse_client_frame ---------------------------------------------------------------------

CLIENT: dict[str, Any] = {
    "header": {"msg_id": "c1", "msg_type": "execute_request", "session": "x", "date": "d"},
    "parent_header": None,
    "channel": "shell",
    "content": {"code": "print('héllo ✓')"},
    "metadata": {},
    "buffers": [],
}


_DROP = object()  # marks a field to leave out of the frame


def client(**changes: Any) -> str:
    obj = {**CLIENT, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not _DROP})


def test_parse_client_frame_basic() -> None:
    msg = parse_client_frame(client())
    assert msg == ClientMessage(
        msg_id="c1",
        msg_type="execute_request",
        parent=None,
        channel="shell",
        content={"code": "print('héllo ✓')"},
        metadata={},
        buffers=(),
    )


def test_parse_client_frame_bytes_input() -> None:
    assert parse_client_frame(client().encode()).msg_id == "c1"


@pytest.mark.parametrize("field", ["header", "channel", "content", "metadata", "buffers"])
def test_client_required_field_missing(field: str) -> None:
    with pytest.raises(ClientFrameError, match=field):
        parse_client_frame(client(**{field: _DROP}))


@pytest.mark.parametrize(
    "parent",
    [None, {}, _DROP],
    ids=["null", "empty-object", "absent"],
)
def test_client_no_parent(parent: Any) -> None:
    # `{}` is accepted on purpose (Kallichore drops the message; see the docstring).
    assert parse_client_frame(client(parent_header=parent)).parent is None


def test_client_parent_kept() -> None:
    parent = {"msg_id": "p1", "msg_type": "comm_open", "username": "ignored"}
    assert parse_client_frame(client(parent_header=parent)).parent == ("p1", "comm_open")


@pytest.mark.parametrize(
    "changes",
    [
        {"parent_header": {"msg_id": "p1"}},
        {"parent_header": {"msg_type": "x"}},
        {"parent_header": "p1"},
        {"parent_header": []},
        {"header": {"msg_id": "c1"}},
        {"header": {"msg_type": "execute_request"}},
        {"header": {"msg_id": 1, "msg_type": "execute_request"}},
        {"header": None},
    ],
)
def test_client_bad_headers(changes: dict[str, Any]) -> None:
    with pytest.raises(ClientFrameError):
        parse_client_frame(client(**changes))


@pytest.mark.parametrize("channel", ["shell", "control", "stdin"])
def test_client_channels_accepted(channel: str) -> None:
    assert parse_client_frame(client(channel=channel)).channel == channel


@pytest.mark.parametrize("channel", ["iopub", "heartbeat", "registration", "Shell", "", 3, None])
def test_client_unsupported_channel(channel: Any) -> None:
    with pytest.raises(ClientFrameError, match="unsupported channel"):
        parse_client_frame(client(channel=channel))


@pytest.mark.parametrize(
    "buffers",
    [["not base64!"], ["aGVsbG8"], ["héllo"], [1], "aGVsbG8=", None],
    ids=["bad-chars", "bad-padding", "non-ascii", "not-string", "not-list", "null"],
)
def test_client_bad_buffers(buffers: Any) -> None:
    with pytest.raises(ClientFrameError, match="buffers"):
        parse_client_frame(client(buffers=buffers))


def test_client_buffers_decoded() -> None:
    msg = parse_client_frame(client(buffers=["aGVsbG8=", "", "AAEC"]))
    assert msg.buffers == (b"hello", b"", b"\x00\x01\x02")


def test_client_extra_kind_ignored() -> None:
    obj = {"kind": "jupyter", "extra": 1, **CLIENT}
    assert parse_client_frame(json.dumps(obj)) == parse_client_frame(client())


@pytest.mark.parametrize("text", ["", "not json", "[1]", "null", b"\xff"])
def test_client_not_an_object(text: str | bytes) -> None:
    with pytest.raises(ClientFrameError):
        parse_client_frame(text)


def test_client_any_json_content_and_metadata() -> None:
    msg = parse_client_frame(client(content=None, metadata=[1, "x"]))
    assert msg.content is None and msg.metadata == [1, "x"]


def test_relay_dict() -> None:
    msg = parse_client_frame(
        client(parent_header={"msg_id": "p", "msg_type": "t"}, buffers=["AAEC"])
    )
    assert msg.relay_dict() == {
        "header": {"msg_id": "c1", "msg_type": "execute_request"},
        "parent_header": {"msg_id": "p", "msg_type": "t"},
        "channel": "shell",
        "content": {"code": "print('héllo ✓')"},
        "metadata": {},
        "buffers": ["AAEC"],
    }
    assert parse_client_frame(client()).relay_dict()["parent_header"] is None


def test_client_message_to_kernel_frames() -> None:
    # The intended path: client frame -> ClientMessage -> build_frames, content re-serialised.
    msg = parse_client_frame(client())
    frames = build(content=dumps(msg.content), metadata=dumps(msg.metadata))
    assert frames[-2:] == [b"{}", '{"code":"print(\'héllo ✓\')"}'.encode()]


# --- kernel events (docs/protocol.md §4.3) -----------------------------------------

CONNECTION = (
    '{"control_port":1,"shell_port":2,"stdin_port":3,"hb_port":4,"iopub_port":5,'
    '"signature_scheme":"hmac-sha256","key":"abc","transport":"tcp","ip":"127.0.0.1"}'
)
USAGE = (
    '{"cpu_percent":3,"memory_bytes":123456789,"thread_count":9,'
    '"sampling_period_ms":1000,"timestamp":1767225600000}'
)


@pytest.mark.parametrize(
    ("frame", "spec"),
    [
        (
            status_event("busy", "execute_request"),
            '{"kind":"kernel","status":{"status":"busy","reason":"execute_request"}}',
        ),
        (status_event("idle", None), '{"kind":"kernel","status":{"status":"idle","reason":null}}'),
        (
            output_event("stdout", "text line\n"),
            '{"kind":"kernel","output":["stdout","text line\\n"]}',
        ),
        (
            output_event("stderr", "héllo ✓\n"),
            '{"kind":"kernel","output":["stderr","héllo ✓\\n"]}',
        ),
        (execution_queued_event("m1"), '{"kind":"kernel","executionQueued":"m1"}'),
        (working_dir_changed_event("/new/cwd"), '{"kind":"kernel","workingDirChanged":"/new/cwd"}'),
        (
            resource_usage_event(json.loads(USAGE)),
            '{"kind":"kernel","resourceUsage":' + USAGE + "}",
        ),
        (
            client_disconnected_event("Another client is connecting to this session."),
            '{"kind":"kernel","clientDisconnected":'
            '"Another client is connecting to this session."}',
        ),
        (exited_event(0), '{"kind":"kernel","exited":0}'),
        (exited_event(-1), '{"kind":"kernel","exited":-1}'),
        (
            handshake_completed_event("s1", json.loads(CONNECTION)),
            '{"kind":"kernel","handshakeCompleted":["s1",' + CONNECTION + "]}",
        ),
        (kernel_event_frame("exited", 2), '{"kind":"kernel","exited":2}'),
        (
            execution_requested_event(
                msg_id="m7", code="print('é')\n", source="agent", workspace_id="ws-1",
                tool="execute_code", agent_name="Claude Code", agent_version="2.1",
                requested_at=datetime(2026, 3, 2, 16, 6, 1, 123456, tzinfo=UTC),
            ),
            '{"kind":"kernel","executionRequested":{"msg_id":"m7","code":"print(\'é\')\\n",'
            '"requested_at":"2026-03-02T16:06:01.123Z","attribution":{"source":"agent",'
            '"agent_name":"Claude Code","agent_version":"2.1","workspace_id":"ws-1",'
            '"tool":"execute_code"}}}',
        ),
        (
            execution_requested_event(
                msg_id="m8", code="1", source="agent", workspace_id="ws-1", tool="evaluate_code",
                requested_at=datetime(2026, 3, 2, 17, 6, 1, tzinfo=timezone(timedelta(hours=1))),
            ),
            '{"kind":"kernel","executionRequested":{"msg_id":"m8","code":"1",'
            '"requested_at":"2026-03-02T16:06:01.000Z","attribution":{"source":"agent",'
            '"workspace_id":"ws-1","tool":"evaluate_code"}}}',
        ),
    ],
)
def test_kernel_event_serialisation(frame: str, spec: str) -> None:
    assert json.loads(frame) == json.loads(spec)
    assert frame.startswith('{"kind":"kernel",')  # "kind" first
    assert frame == spec  # compact, and non-ASCII kept as serde_json writes it


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda: kernel_event_frame("bogus", 1), ValueError),
        (lambda: kernel_event_frame("Status", {}), ValueError),
        (lambda: output_event("stdlog", "x"), ValueError),
    ],
)
def test_kernel_event_rejects_unknown(call: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        call()
