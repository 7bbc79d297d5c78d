"""attrs classes for every schema of kallichore.json, and the one converter that maps them.

Field names are the wire names (snake_case). Optional fields default to None and are omitted
from JSON when None. Enums are `Literal`s so that the converter rejects unknown values.
The converter is strict about JSON types (a string is not silently turned into a number, nor a
number into a string), as the reference server's serde is.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, TypeVar, get_origin

import attrs
import cattrs
from cattrs.cols import list_structure_factory
from cattrs.gen import make_dict_unstructure_fn

SessionMode = Literal["console", "notebook", "background"]
InterruptMode = Literal["signal", "message"]
StartupEnvironment = Literal["none", "shell", "command", "script"]
VarActionType = Literal["replace", "append", "prepend"]
Status = Literal["uninitialized", "starting", "ready", "idle", "busy", "offline", "exited"]
LogLevelName = Literal["trace", "debug", "info", "warn", "error"]


@attrs.frozen
class ErrorModel:
    code: str
    message: str
    details: str | None = None


@attrs.frozen
class VarAction:
    action: VarActionType
    name: str
    value: str


@attrs.frozen
class ConnectionInfo:
    control_port: int
    shell_port: int
    stdin_port: int
    hb_port: int
    iopub_port: int
    signature_scheme: str
    key: str
    transport: str
    ip: str


@attrs.frozen
class StartupErrorModel:
    error: ErrorModel
    exit_code: int | None = None
    output: str | None = None


@attrs.frozen
class ClientHeartbeat:
    process_id: int | None = None


@attrs.frozen(kw_only=True)
class NewSession:
    session_id: str
    display_name: str
    language: str
    username: str
    input_prompt: str
    continuation_prompt: str
    argv: list[str]
    working_directory: str
    env: list[VarAction]
    interrupt_mode: InterruptMode
    # Required by the reference; defaulted here because mid-2025 Positron builds omit them
    # (they send `run_in_shell` instead; see docs/differences.md).
    session_mode: SessionMode = "console"
    startup_environment: StartupEnvironment = "none"
    notebook_uri: str | None = None
    connection_timeout: int | None = None
    protocol_version: str | None = None
    startup_environment_arg: str | None = None
    run_in_shell: bool | None = None
    #: The MCP workspace the session belongs to (0.1.69); stored, not shown.
    workspace_id: str | None = None


@attrs.frozen
class NewSessionResponse:
    session_id: str


@attrs.frozen
class RestartSession:
    working_directory: str | None = None
    env: list[VarAction] | None = None


@attrs.frozen
class ExecutionQueueModel:
    length: int
    pending: list[dict[str, Any]]
    active: dict[str, Any] | None = None


@attrs.frozen
class ResourceUsage:
    cpu_percent: int
    memory_bytes: int
    thread_count: int
    sampling_period_ms: int
    timestamp: int


@attrs.frozen
class HistoryError:
    name: str
    message: str
    traceback: list[str]


@attrs.frozen(kw_only=True)
class HistoryEntry:
    """One execution in a session's history (docs/differences.md, "Execute and history")."""

    input: str
    output: str
    timestamp: int  # ms since the epoch, when the request was sent
    truncated: bool
    error: HistoryError | None = None
    source: str | None = None
    agent: str | None = None


@attrs.frozen(kw_only=True)
class ActiveSession:
    session_id: str
    argv: list[str]
    username: str
    display_name: str
    language: str
    interrupt_mode: InterruptMode
    connected: bool
    started: dt.datetime
    session_mode: SessionMode
    working_directory: str
    input_prompt: str
    continuation_prompt: str
    execution_queue: ExecutionQueueModel
    status: Status
    kernel_info: dict[str, Any]
    idle_seconds: int
    busy_seconds: int
    initial_env: dict[str, str] | None = None
    process_id: int | None = None
    notebook_uri: str | None = None
    resource_usage: ResourceUsage | None = None
    socket_path: str | None = None
    #: The last three history entries, oldest first.
    history: list[HistoryEntry] = attrs.field(factory=list)


@attrs.frozen
class SessionList:
    total: int
    sessions: list[ActiveSession]


@attrs.frozen(kw_only=True)
class McpClient:
    id: int
    connected_at: dt.datetime
    name: str | None = None
    version: str | None = None
    pid: int | None = None
    working_directory: str | None = None
    session_id: str | None = None


@attrs.frozen(kw_only=True)
class McpWorkspace:
    id: str
    display_name: str
    connected: bool
    clients: list[McpClient]


@attrs.frozen(kw_only=True)
class McpStatus:
    """The `mcp` block of /status. `port` is required and null while no listener runs."""

    active: bool = False
    port: int | None
    request_count: int = 0
    workspaces: list[McpWorkspace] = attrs.field(factory=list)


def inactive_mcp() -> McpStatus:
    return McpStatus(active=False, port=None, request_count=0, workspaces=[])


@attrs.frozen(kw_only=True)
class ServerStatus:
    sessions: int
    active: int
    busy: bool
    idle_seconds: int
    busy_seconds: int
    uptime_seconds: int
    version: str
    process_id: int
    started: dt.datetime
    server_id: str | None = None
    mcp: McpStatus = attrs.field(factory=inactive_mcp)


@attrs.frozen
class ServerConfiguration:
    idle_shutdown_hours: int | None = None
    resource_sample_interval_ms: int | None = None
    log_level: LogLevelName | None = None
    resource_include_children: bool | None = None


@attrs.frozen(kw_only=True)
class ExecuteRequest:
    """The body of POST /sessions/{id}/execute."""

    code: str
    silent: bool = False
    store_history: bool = True
    stop_on_error: bool = True
    timeout_seconds: float | None = None


@attrs.frozen(kw_only=True)
class StreamOutput:
    stream_name: Literal["stdout", "stderr"]
    text: str
    type: Literal["stream"] = "stream"


@attrs.frozen(kw_only=True)
class DisplayDataOutput:
    data: dict[str, Any]
    metadata: dict[str, Any] | None = None
    type: Literal["display_data"] = "display_data"


@attrs.frozen(kw_only=True)
class ErrorOutput:
    error_name: str
    error_message: str
    error_traceback: list[str]
    type: Literal["error"] = "error"


ExecuteOutput = StreamOutput | DisplayDataOutput | ErrorOutput
_OUTPUT_TYPES: dict[str, type] = {
    "stream": StreamOutput, "display_data": DisplayDataOutput, "error": ErrorOutput,
}


@attrs.frozen(kw_only=True)
class ExecuteResponse:
    """What POST /execute answers (core.collector.ExecutionCollector.result builds it)."""

    status: Literal["ok", "error"]
    execution_count: int
    output: list[ExecuteOutput]
    data: dict[str, Any] | None = None
    error_name: str | None = None
    error_message: str | None = None
    error_traceback: list[str] | None = None


#: Every schema of kallichore.json, by its name there.
SCHEMAS: dict[str, type] = {
    "error": ErrorModel,
    "varAction": VarAction,
    "connectionInfo": ConnectionInfo,
    "startupError": StartupErrorModel,
    "clientHeartbeat": ClientHeartbeat,
    "newSession": NewSession,
    "restartSession": RestartSession,
    "execution_queue": ExecutionQueueModel,
    "activeSession": ActiveSession,
    "serverStatus": ServerStatus,
    "resourceUsage": ResourceUsage,
    "sessionList": SessionList,
    "serverConfiguration": ServerConfiguration,
    # 0.1.69
    "executeRequest": ExecuteRequest,
    "executeResponse": ExecuteResponse,
    "streamOutput": StreamOutput,
    "displayDataOutput": DisplayDataOutput,
    "errorOutput": ErrorOutput,
    "historyEntry": HistoryEntry,
    "historyError": HistoryError,
    "mcpStatus": McpStatus,
    "mcpWorkspace": McpWorkspace,
    "mcpClient": McpClient,
}


def rfc3339_utc(value: dt.datetime) -> str:
    """RFC 3339 in UTC with a `Z`, as the reference's chrono serialisation writes it."""
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _strict(kind: type, name: str) -> Any:
    def structure(value: Any, _: Any) -> Any:
        # bool is an int subclass in Python but not a JSON number.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value

    return structure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(omit_if_default=False, forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))

    def number(value: Any, _: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)

    conv.register_structure_hook(float, number)

    def output(value: Any, _: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in _OUTPUT_TYPES:
            raise ValueError(f"an output's type must be one of {sorted(_OUTPUT_TYPES)}")
        return conv.structure(value, _OUTPUT_TYPES[kind])

    conv.register_structure_hook(ExecuteOutput, output)
    conv.register_structure_hook_func(
        lambda t: t == dict[str, Any], _strict(dict, "an object")
    )
    def strict_list(cls: Any, c: cattrs.Converter) -> Any:
        inner = list_structure_factory(cls, c)

        def structure(value: Any, t: Any) -> Any:
            if not isinstance(value, list):  # an object is iterable too: not an array
                raise TypeError(f"expected an array, got {type(value).__name__}")
            return inner(value, t)

        return structure

    conv.register_structure_hook_factory(lambda t: get_origin(t) is list, strict_list)
    conv.register_unstructure_hook(dt.datetime, rfc3339_utc)
    conv.register_structure_hook(dt.datetime, lambda v, _: dt.datetime.fromisoformat(v))

    # Omit optional fields (default None) when they are None; keep every required field.
    def omit_none(cls: type) -> Any:
        overrides = {
            a.name: cattrs.override(omit_if_default=True)
            for a in attrs.fields(cls)
            if a.default is None
        }
        return make_dict_unstructure_fn(cls, conv, **overrides)

    conv.register_unstructure_hook_factory(attrs.has, omit_none)
    return conv


converter = _make_converter()

T = TypeVar("T")


class BodyError(ValueError):
    """A request body that is missing or does not match its schema."""


def parse_body(raw: bytes, cls: type[T], *, schema: str, required: bool = True) -> T | None:
    """Parse a JSON request body into `cls`, with the reference's plain-text error messages."""
    import json

    if not raw.strip():
        if required:
            raise BodyError(f"Missing required body parameter {schema}")
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(
            f"Couldn't parse body parameter {schema} - doesn't match schema: invalid JSON: {exc}"
        ) from None
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            reason = "; ".join(cattrs.transform_error(exc))
        else:
            reason = str(exc)
        raise BodyError(
            f"Couldn't parse body parameter {schema} - doesn't match schema: {reason}"
        ) from None


def unknown_fields(raw_obj: Any, cls: type) -> list[str]:
    """Top-level keys of a request body that `cls` does not have (they are ignored)."""
    if not isinstance(raw_obj, dict):
        return []
    names = {a.name for a in attrs.fields(cls)}
    return sorted(k for k in raw_obj if k not in names)


def dump(value: Any) -> Any:
    """The JSON-ready form of a model."""
    return converter.unstructure(value)
