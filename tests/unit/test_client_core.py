"""The client's pure parts, table-tested: frames, errors from answers, discovery, results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from kallichore_trio.client import discovery
from kallichore_trio.client import messages as m
from kallichore_trio.client.errors import (
    ApiError,
    AuthError,
    DaemonNotFound,
    ExecutionTimeout,
    SessionExists,
    SessionNotFound,
    SessionNotRunning,
    StartupFailed,
    error_for_response,
)
from kallichore_trio.client.results import result_from
from kallichore_trio.core.collector import ExecutionCollector


@pytest.mark.parametrize(("frame", "expected"), [
    ('{"kind":"kernel","status":{"status":"busy","reason":"x"}}',
     m.StatusEvent("status", "busy", "x")),
    ('{"kind":"kernel","output":["stderr","line\\n"]}',
     m.OutputEvent("output", "stderr", "line\n")),
    ('{"kind":"kernel","exited":-1}', m.ExitedEvent("exited", -1)),
    ('{"kind":"kernel","workingDirChanged":"/tmp"}',
     m.WorkingDirChanged("workingDirChanged", "/tmp")),
    ('{"kind":"kernel","clientDisconnected":"bye"}',
     m.ClientDisconnected("clientDisconnected", "bye")),
    ('{"kind":"kernel","executionQueued":"abc"}', m.ExecutionQueued("executionQueued", "abc")),
    ('{"kind":"kernel","somethingNew":[1]}', m.OtherEvent("somethingNew", [1])),
])
def test_kernel_events_are_typed(frame: str, expected: m.KernelEvent) -> None:
    assert m.parse_frame(frame) == expected


def test_a_relayed_message_keeps_its_parent() -> None:
    frame = json.dumps({"kind": "jupyter", "header": {"msg_id": "a", "msg_type": "stream"},
                        "parent_header": {"msg_id": "p", "msg_type": "execute_request"},
                        "channel": "iopub", "content": {"name": "stdout", "text": "hi"},
                        "metadata": {}, "buffers": []})
    msg = m.parse_frame(frame)
    assert isinstance(msg, m.Message)
    assert (msg.msg_id, msg.msg_type, msg.channel, msg.parent_id) == ("a", "stream", "iopub", "p")
    unparented = m.parse_frame(frame.replace('{"msg_id": "p", "msg_type": "execute_request"}',
                                             "null"))
    assert isinstance(unparented, m.Message) and unparented.parent_id is None


@pytest.mark.parametrize("frame", ["not json", "[]", '{"kind":"other"}',
                                   '{"kind":"kernel","a":1,"b":2}'])
def test_frames_that_are_neither_are_refused(frame: str) -> None:
    with pytest.raises(m.FrameError):
        m.parse_frame(frame)


def test_requests_are_in_relay_form() -> None:
    msg = m.request("input_reply", {"value": "x"}, channel="stdin", parent=("r", "input_request"))
    assert msg["parent_header"] == {"msg_id": "r", "msg_type": "input_request"}
    assert set(msg) == {"header", "parent_header", "channel", "content", "metadata", "buffers"}


def _answer(status: int, body: object = None) -> httpx.Response:
    content = b"" if body is None else (body.encode() if isinstance(body, str)
                                        else json.dumps(body).encode())
    return httpx.Response(status, content=content)


@pytest.mark.parametrize(("answer", "session_id", "cls"), [
    (_answer(401), None, AuthError),
    (_answer(404), "s", SessionNotFound),
    (_answer(400, {"code": "KS-0", "message": "Session s already exists"}), "s", SessionExists),
    (_answer(400, {"code": "KS-3", "message": "Session s is not running"}), "s",
     SessionNotRunning),
    (_answer(400, {"code": "KS-12", "message": "no process"}), "s", SessionNotRunning),
    (_answer(408, {"code": "execution_timeout", "message": "late"}), "s", ExecutionTimeout),
    (_answer(400, {"code": "KS-9", "message": "bad"}), "s", ApiError),
    (_answer(400, "Missing required body parameter NewSession"), None, ApiError),
])
def test_answers_map_to_errors(answer: httpx.Response, session_id: str | None,
                               cls: type) -> None:
    error = error_for_response(answer, what="do it", session_id=session_id)
    assert type(error) is cls
    assert str(error).startswith("do it")


def test_a_startup_error_carries_the_output_and_exit_code() -> None:
    error = error_for_response(_answer(500, {
        "exit_code": 3, "output": "boom\n",
        "error": {"code": "KS-8", "message": "The process exited abnormally (exit status: 3)"}}),
        what="start session s", session_id="s")
    assert isinstance(error, StartupFailed)
    assert (error.exit_code, error.output, error.code) == (3, "boom\n", "KS-8")
    assert "boom" in str(error) and "exit code 3" in str(error)


@pytest.mark.parametrize(("doc", "base_url", "uds"), [
    ({"port": 5, "base_path": "http://127.0.0.1:5", "transport": "tcp", "bearer_token": "t"},
     "http://127.0.0.1:5", None),
    ({"socket_path": "/tmp/k.sock", "transport": "socket", "bearer_token": "t"},
     "http://localhost", "/tmp/k.sock"),
])
def test_connection_documents(doc: dict, base_url: str, uds: str | None) -> None:
    address = discovery.from_document(doc)
    assert (address.base_url, address.uds, address.token) == (base_url, uds, "t")


def test_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(discovery.ENV_VAR, raising=False)
    with pytest.raises(DaemonNotFound, match="no running kcserver"):
        discovery.find_server()
    # A default file of a live process is found; one of a dead process is not.
    live = tmp_path / f"kcserver-{os.getpid()}.json"
    live.write_text(json.dumps({"port": 1, "base_path": "http://127.0.0.1:1",
                                "bearer_token": "live"}))
    (tmp_path / "kcserver-999999999.json").write_text(json.dumps({"port": 2}))
    assert discovery.find_server().token == "live"
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"port": 3, "bearer_token": "env"}))
    monkeypatch.setenv(discovery.ENV_VAR, str(env_file))
    assert discovery.find_server().base_url == "http://127.0.0.1:3"
    assert discovery.find_server(url="http://127.0.0.1:4", token="x").token == "x"
    assert discovery.find_server(url="unix:/tmp/a.sock").uds == "/tmp/a.sock"
    with pytest.raises(DaemonNotFound, match="no connection file"):
        discovery.find_server(tmp_path / "missing.json")


def test_results_come_from_the_daemons_collector() -> None:
    collector = ExecutionCollector("x")
    for msg_type, content in [
        ("status", {"execution_state": "busy"}),
        ("stream", {"name": "stdout", "text": "a"}),
        ("stream", {"name": "stderr", "text": "e"}),
        ("stream", {"name": "stdout", "text": "b"}),
        ("display_data", {"data": {"text/plain": "d"}, "metadata": {}}),
        ("execute_result", {"data": {"text/plain": "r"}, "execution_count": 4}),
        ("execute_reply", {"status": "ok", "execution_count": 4}),
        ("status", {"execution_state": "idle"}),
    ]:
        collector.feed(msg_type, content)
    result = result_from(collector, "id")
    assert (result.stdout, result.stderr, result.execution_count) == ("ab", "e", 4)
    assert [(o.kind, o.data) for o in result.outputs] == [
        ("display_data", {"text/plain": "d"}), ("execute_result", {"text/plain": "r"})]
    assert result.ok and result.result == {"text/plain": "r"}
