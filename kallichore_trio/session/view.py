"""The HTTP view of a session: what GET /sessions and GET /sessions/{id} show."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from kallichore_trio.models import ActiveSession, ExecutionQueueModel, HistoryEntry, converter

if TYPE_CHECKING:
    from kallichore_trio.session.session import Session

#: History entries shown with a session.
RECENT_HISTORY = 3


def active_session(session: Session) -> ActiveSession:
    now = trio.current_time()
    model = session.model
    kernel = session.kernel
    attached = session.client_attached
    return ActiveSession(
        session_id=session.session_id,
        argv=list(model.argv),
        process_id=kernel.pid if kernel else None,
        username=model.username,
        display_name=model.display_name,
        language=model.language,
        interrupt_mode=model.interrupt_mode,
        initial_env=session.initial_env,
        # The wire field says `connected`: a client is attached (not: the kernel is running).
        connected=attached,
        started=session.created,
        session_mode=model.session_mode,
        working_directory=session.working_directory,
        notebook_uri=model.notebook_uri,
        input_prompt=session.input_prompt,
        continuation_prompt=session.continuation_prompt,
        execution_queue=converter.structure(session.queue.to_dict(), ExecutionQueueModel),
        status=session.state.status,
        kernel_info=session.kernel_info,
        resource_usage=session.resource_usage,
        idle_seconds=session.state.idle_seconds(now),
        busy_seconds=session.state.busy_seconds(now),
        socket_path=session.socket_path if attached else None,
        history=converter.structure(session.executions.recent(RECENT_HISTORY),
                                    list[HistoryEntry]),
    )
