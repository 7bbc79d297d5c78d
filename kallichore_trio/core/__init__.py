"""Pure cores shared by the daemon's I/O parts. Pure: no trio, zmq or quart import here.

`relay` decides what the session does with each message, both ways; `state` is the session's
status machine and its clocks; `queue` the execution queue; `outbox` the bounded,
sequence-numbered frames on their way to a client. `collector.ExecutionCollector` follows one
execute_request's messages and produces both the `/execute` reply body and the history entry;
`history` clips text for history entries.
"""

from kallichore_trio.core.collector import (
    HISTORY_WINDOW,
    REPLY_WINDOW,
    ExecutionCollector,
    Window,
)
from kallichore_trio.core.history import (
    CLIP_BYTES,
    ERROR_MESSAGE_BYTES,
    ERROR_NAME_BYTES,
    clip,
    clip_error,
    clip_head,
    omitted_marker,
)

__all__ = [
    "CLIP_BYTES",
    "ERROR_MESSAGE_BYTES",
    "ERROR_NAME_BYTES",
    "HISTORY_WINDOW",
    "REPLY_WINDOW",
    "ExecutionCollector",
    "Window",
    "clip",
    "clip_error",
    "clip_head",
    "omitted_marker",
]
