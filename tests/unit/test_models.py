"""Every schema of kallichore.json has a model; JSON round-trips with exact field names."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from kallichore_trio import models

# A copy of the contract (Kallichore's OpenAPI document), with the 0.1.69 additions written in as
# docs/differences.md describes them ("Execute and history").
SPEC = json.loads((Path(__file__).parents[1] / "data" / "kallichore.json").read_text())
NOW = dt.datetime(2026, 3, 2, 16, 6, 1, 123456, tzinfo=dt.UTC)

EXAMPLES: dict[str, Any] = {
    "error": models.ErrorModel("KS-1", "Session x not found", "why"),
    "varAction": models.VarAction("append", "PATH", ":/opt/bin"),
    "connectionInfo": models.ConnectionInfo(1, 2, 3, 4, 5, "hmac-sha256", "k", "tcp", "127.0.0.1"),
    "startupError": models.StartupErrorModel(models.ErrorModel("KS-8", "m"), 1, "out"),
    "clientHeartbeat": models.ClientHeartbeat(42),
    "newSession": models.NewSession(
        session_id="s", display_name="d", language="python", username="u", input_prompt="",
        continuation_prompt="", argv=["python"], working_directory="/tmp",
        env=[models.VarAction("replace", "A", "b")], interrupt_mode="signal",
        session_mode="notebook", startup_environment="command", notebook_uri="file:///n",
        connection_timeout=5, protocol_version="5.5", startup_environment_arg="echo hi",
    ),
    "restartSession": models.RestartSession("/tmp", [models.VarAction("prepend", "P", "x:")]),
    "execution_queue": models.ExecutionQueueModel(1, [{"header": {}}], {"header": {}}),
    "resourceUsage": models.ResourceUsage(3, 1000, 9, 1000, 1767225600000),
    "serverStatus": models.ServerStatus(
        sessions=1, active=1, busy=True, idle_seconds=0, busy_seconds=2, uptime_seconds=9,
        version="0.1.69", process_id=7, started=NOW, server_id="id",
    ),
    "serverConfiguration": models.ServerConfiguration(4, 1000, "debug", False),
    "executeRequest": models.ExecuteRequest(code="1+1", silent=True, store_history=False,
                                            stop_on_error=False, timeout_seconds=2.5),
    "streamOutput": models.StreamOutput(stream_name="stderr", text="x\n"),
    "displayDataOutput": models.DisplayDataOutput(data={"text/plain": "1"},
                                                  metadata={"isolated": True}),
    "errorOutput": models.ErrorOutput(error_name="E", error_message="m",
                                      error_traceback=["a", "b"]),
    "historyError": models.HistoryError("ZeroDivisionError", "division by zero", ["t"]),
    "mcpClient": models.McpClient(id=1, connected_at=NOW, name="claude", version="2",
                                  pid=5, working_directory="/w", session_id="s"),
}
EXAMPLES["executeResponse"] = models.ExecuteResponse(
    status="error", execution_count=3,
    output=[EXAMPLES["streamOutput"], EXAMPLES["displayDataOutput"], EXAMPLES["errorOutput"]],
    data={"text/plain": "2"}, error_name="E", error_message="m", error_traceback=["a", "b"],
)
EXAMPLES["historyEntry"] = models.HistoryEntry(
    input="1/0", output="", timestamp=1767225600000, truncated=False,
    error=EXAMPLES["historyError"], source="console", agent="claude",
)
EXAMPLES["mcpWorkspace"] = models.McpWorkspace(id="w", display_name="W", connected=True,
                                               clients=[EXAMPLES["mcpClient"]])
EXAMPLES["mcpStatus"] = models.McpStatus(active=True, port=4000, request_count=2,
                                         workspaces=[EXAMPLES["mcpWorkspace"]])
EXAMPLES["serverStatus"] = attrs.evolve(EXAMPLES["serverStatus"], mcp=EXAMPLES["mcpStatus"])
EXAMPLES["activeSession"] = models.ActiveSession(
    session_id="s", argv=["python"], username="u", display_name="d", language="python",
    interrupt_mode="message", connected=False, started=NOW, session_mode="console",
    working_directory="/tmp", input_prompt=">", continuation_prompt="+",
    execution_queue=EXAMPLES["execution_queue"], status="busy", kernel_info={"a": 1},
    idle_seconds=0, busy_seconds=1, initial_env={"A": "b"}, process_id=9,
    resource_usage=EXAMPLES["resourceUsage"], socket_path="/tmp/s.sock",
    history=[EXAMPLES["historyEntry"]],
)
EXAMPLES["sessionList"] = models.SessionList(1, [EXAMPLES["activeSession"]])


def test_every_schema_of_the_spec_has_a_model() -> None:
    spec_names = set(SPEC["components"]["schemas"])
    enums_and_arrays = {"envVarActions", "sessionMode", "varActionType", "startupEnvironment",
                        "status", "interrupt_mode"}
    assert spec_names - enums_and_arrays == set(models.SCHEMAS)
    assert set(EXAMPLES) == set(models.SCHEMAS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip(name: str) -> None:
    value = EXAMPLES[name]
    data = json.loads(json.dumps(models.dump(value)))
    assert models.converter.structure(data, type(value)) == value
    spec = SPEC["components"]["schemas"][name]
    assert set(spec.get("required", [])) <= set(data)
    assert set(data) - set(spec.get("properties", {})) <= {"server_id", "run_in_shell"}


def test_an_inactive_mcp_block_shows_a_null_port() -> None:
    assert models.dump(models.inactive_mcp()) == {
        "active": False, "port": None, "request_count": 0, "workspaces": []}


@pytest.mark.parametrize(
    "body",
    [
        {"code": 1},
        {"code": "x", "timeout_seconds": "5"},
        {"code": "x", "timeout_seconds": True},
        {"code": "x", "silent": "yes"},
        {"silent": True},
    ],
)
def test_execute_request_types_are_strict(body: dict[str, Any]) -> None:
    with pytest.raises(models.BodyError):
        models.parse_body(json.dumps(body).encode(), models.ExecuteRequest, schema="ExecuteRequest")


def test_an_execute_output_needs_a_known_type() -> None:
    body = {"status": "ok", "execution_count": 1, "output": [{"type": "picture", "data": {}}]}
    with pytest.raises(models.BodyError, match=r"\$\.output\[0\]"):
        models.parse_body(json.dumps(body).encode(), models.ExecuteResponse, schema="R")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_optional_fields_are_omitted_when_absent(name: str) -> None:
    cls = models.SCHEMAS[name]
    value = attrs.evolve(
        EXAMPLES[name], **{a.name: None for a in attrs.fields(cls) if a.default is None}
    )
    data = models.dump(value)
    assert not [k for k, v in data.items() if v is None]


def test_timestamps_are_rfc3339_utc_with_z() -> None:
    assert models.dump(EXAMPLES["serverStatus"])["started"] == "2026-03-02T16:06:01.123456Z"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "Missing required body parameter NewSession"),
        (b"{", "invalid JSON"),
        (b'{"session_id": 5}', "expected str @ $.session_id"),
        (b"[]", "doesn't match schema"),
    ],
)
def test_bad_bodies_get_the_reference_texts(body: bytes, message: str) -> None:
    with pytest.raises(models.BodyError, match=r"NewSession|doesn't match") as info:
        models.parse_body(body, models.NewSession, schema="NewSession")
    assert message in str(info.value)


def test_an_env_object_instead_of_an_array_is_rejected() -> None:
    body = json.loads(json.dumps(models.dump(EXAMPLES["newSession"])))
    body["env"] = {}
    with pytest.raises(models.BodyError):
        models.parse_body(json.dumps(body).encode(), models.NewSession, schema="NewSession")


def test_unknown_fields_are_reported_and_ignored() -> None:
    body = models.dump(EXAMPLES["varAction"]) | {"surprise": 1}
    assert models.unknown_fields(body, models.VarAction) == ["surprise"]
    parsed = models.parse_body(json.dumps(body).encode(), models.VarAction, schema="VarAction")
    assert parsed == EXAMPLES["varAction"]
