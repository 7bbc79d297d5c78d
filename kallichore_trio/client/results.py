"""ExecutionResult: what one execute_request produced, built by the daemon's own collector.

The client feeds `kallichore_trio.core.collector.ExecutionCollector` the messages whose parent
is the request, exactly as the daemon does for `POST /execute`, so both agree on what an
execution's result is (streams joined, outputs in order, the error, a window on huge output).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from kallichore_trio.client.errors import KernelError
from kallichore_trio.client.messages import KernelEvent
from kallichore_trio.core.collector import ExecutionCollector


@attrs.frozen
class ErrorInfo:
    """The exception raised by the code: `ename`, `evalue`, and the traceback lines (with the
    kernel's ANSI colours)."""

    ename: str
    evalue: str
    traceback: list[str]


@attrs.frozen
class Output:
    """A rich output: `kind` is `display_data` or `execute_result`; `data` the mime bundle."""

    kind: str
    data: dict[str, Any]
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ExecutionResult:
    msg_id: str
    status: str  # "ok" or "error" (an aborted request is "error")
    execution_count: int
    stdout: str
    stderr: str
    #: display_data bundles in order, then the execute_result (if any) last.
    outputs: list[Output]
    error: ErrorInfo | None = None
    #: FramesLost / SupervisorRestarted notices that came while it ran: frames of the session
    #: were lost then, possibly some of this execution's output (docs/client.md).
    notices: tuple[KernelEvent, ...] = ()

    @property
    def may_be_incomplete(self) -> bool:
        """The daemon reported frames lost while it ran (see `notices`)."""
        return bool(self.notices)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def result(self) -> dict[str, Any] | None:
        """The execute_result's mime bundle (`result["text/plain"]`: the value's repr)."""
        for output in self.outputs:
            if output.kind == "execute_result":
                return output.data
        return None

    def raise_for_error(self) -> ExecutionResult:
        """Raise `KernelError` if the code raised; else return self (chainable)."""
        if self.error is not None:
            raise KernelError(f"{self.error.ename}: {self.error.evalue}", result=self)
        return self


def result_from(collector: ExecutionCollector, msg_id: str,
                notices: Iterable[KernelEvent] = ()) -> ExecutionResult:
    body = collector.result()
    stdout: list[str] = []
    stderr: list[str] = []
    outputs: list[Output] = []
    for item in body["output"]:
        if item["type"] == "stream":
            (stderr if item["stream_name"] == "stderr" else stdout).append(item["text"])
        elif item["type"] == "display_data":
            outputs.append(Output("display_data", item["data"], item.get("metadata") or {}))
    if "data" in body:
        outputs.append(Output("execute_result", body["data"]))
    error = None
    if "error_name" in body:
        error = ErrorInfo(body["error_name"], body["error_message"], body["error_traceback"])
    return ExecutionResult(msg_id=msg_id, status=body["status"],
                           execution_count=body["execution_count"], stdout="".join(stdout),
                           stderr="".join(stderr), outputs=outputs, error=error,
                           notices=tuple(notices))
