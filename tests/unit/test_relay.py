"""core.relay: the session's message-path decisions, table-tested (no kernel, no trio)."""

from __future__ import annotations

from typing import Any

import pytest

from kallichore_trio.core import relay
from kallichore_trio.core.relay import (
    BUSY,
    CLEAR_QUEUE_AND_SEND,
    EXECUTE,
    EXECUTE_REPLY,
    IDLE,
    IDLE_AFTER_EXECUTE,
    IGNORED,
    OUTPUT,
    PLAIN,
    SEND,
    STATUS,
)


@pytest.mark.parametrize(
    ("channel", "msg_type", "kind"),
    [
        ("iopub", "status", STATUS),
        ("iopub", "stream", OUTPUT),
        ("iopub", "execute_result", PLAIN),
        ("iopub", "display_data", PLAIN),
        ("iopub", "error", PLAIN),
        ("iopub", "execute_input", PLAIN),
        ("iopub", "comm_msg", PLAIN),
        # Only iopub carries statuses and stream output.
        ("shell", "status", PLAIN),
        ("shell", "stream", PLAIN),
        ("shell", "execute_reply", EXECUTE_REPLY),
        ("shell", "kernel_info_reply", PLAIN),
        ("shell", "complete_reply", PLAIN),
        # An execute_reply elsewhere is not the shell's answer to a queued request.
        ("control", "execute_reply", PLAIN),
        ("iopub", "execute_reply", PLAIN),
        ("control", "interrupt_reply", PLAIN),
        ("control", "shutdown_reply", PLAIN),
        ("stdin", "input_request", PLAIN),
        ("hb", "anything", PLAIN),
    ],
)
def test_kind_of_a_kernel_message(channel: str, msg_type: str, kind: relay.Kind) -> None:
    assert relay.kind_of(channel, msg_type) is kind


@pytest.mark.parametrize(
    ("content", "parent_msg_type", "verdict"),
    [
        ({"execution_state": "busy"}, "execute_request", BUSY),
        ({"execution_state": "busy"}, "kernel_info_request", BUSY),
        ({"execution_state": "busy"}, None, BUSY),
        ({"execution_state": "idle"}, "execute_request", IDLE_AFTER_EXECUTE),
        ({"execution_state": "idle"}, "comm_msg", IDLE),
        ({"execution_state": "idle"}, "inspect_request", IDLE),
        ({"execution_state": "idle"}, None, IDLE),
        # `starting` (sent once by some kernels) and anything malformed change nothing.
        ({"execution_state": "starting"}, "execute_request", IGNORED),
        ({"execution_state": "IDLE"}, "execute_request", IGNORED),
        ({"execution_state": ["idle"]}, "execute_request", IGNORED),
        ({"execution_state": None}, "execute_request", IGNORED),
        ({}, "execute_request", IGNORED),
        (["idle"], "execute_request", IGNORED),
        ("idle", "execute_request", IGNORED),
        (None, "execute_request", IGNORED),
    ],
)
def test_status_verdict(content: Any, parent_msg_type: str | None,
                        verdict: relay.StatusVerdict) -> None:
    assert relay.status_verdict(content, parent_msg_type) is verdict


@pytest.mark.parametrize(
    ("verdict", "status", "ends_request", "checks_cwd"),
    [
        (BUSY, "busy", False, False),
        (IDLE, "idle", True, False),
        (IDLE_AFTER_EXECUTE, "idle", True, True),
        (IGNORED, None, False, False),
    ],
)
def test_what_each_status_verdict_asks_for(verdict: relay.StatusVerdict, status: str | None,
                                           ends_request: bool, checks_cwd: bool) -> None:
    assert (verdict.status, verdict.ends_request, verdict.checks_cwd) == (
        status, ends_request, checks_cwd)


@pytest.mark.parametrize(
    ("msg_type", "content", "action"),
    [
        ("execute_request", {"code": "1+1"}, EXECUTE),
        ("execute_request", {"code": ""}, EXECUTE),
        ("execute_request", {"code": "x", "silent": True}, EXECUTE),
        # Without code it is not followed or queued: the kernel answers it as it sees fit.
        ("execute_request", {}, SEND),
        ("execute_request", {"code": None}, SEND),
        ("execute_request", {"code": ["1"]}, SEND),
        ("execute_request", None, SEND),
        ("execute_request", "1+1", SEND),
        ("interrupt_request", {}, CLEAR_QUEUE_AND_SEND),
        ("shutdown_request", {"restart": False}, CLEAR_QUEUE_AND_SEND),
        ("shutdown_request", {"restart": True}, CLEAR_QUEUE_AND_SEND),
        ("kernel_info_request", {}, SEND),
        ("complete_request", {"code": "pri", "cursor_pos": 3}, SEND),
        ("comm_msg", {"data": {}}, SEND),
        ("input_reply", {"value": "x"}, SEND),
    ],
)
def test_client_action(msg_type: str, content: Any, action: relay.ClientAction) -> None:
    assert relay.client_action(msg_type, content) is action


def test_the_requests_that_clear_the_queue() -> None:
    assert relay.ENDS_RUNNING == {"interrupt_request", "shutdown_request"}
