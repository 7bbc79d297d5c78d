"""SessionRegistry: every session of the daemon, each running in the registry's nursery.

With a record store (state.py), each session's record is kept while the session lives and
removed when it is deleted or the daemon shuts down; at start the registry takes over the
sessions of daemons that died (`reattach_orphans`, docs/durability.md).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import zmq

from kallichore_trio.config import KALLICHORE_VERSION, Config
from kallichore_trio.errors import SessionExists, SessionNotFound, SessionRunning
from kallichore_trio.kernel import launch
from kallichore_trio.models import NewSession, ServerStatus
from kallichore_trio.session import durable
from kallichore_trio.session.session import Session
from kallichore_trio.state import TOUCH_PERIOD, RecordStore
from kallichore_trio.timers import next_multiple

log = logging.getLogger(__name__)


class SessionRegistry:
    def __init__(
        self,
        config: Config,
        nursery: trio.Nursery,
        zmq_context: zmq.Context[Any],
        runtime_dir: Path,
        on_activity: Callable[[], None] = lambda: None,
        on_traffic: Callable[[], None] = lambda: None,
        extra_env: Callable[[Session], dict[str, str]] = lambda _: {},
        store: RecordStore | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._nursery = nursery
        self.zmq_context = zmq_context
        self.runtime_dir = runtime_dir
        self.on_activity = on_activity
        self.on_traffic = on_traffic  # a message relayed, either way (busypoll.py)
        self.sessions: dict[str, Session] = {}
        #: Extra kernel environment for a session (MCP's kernel_env), given to each session.
        self.extra_env = extra_env
        self.started_at = trio.current_time()
        self.started_wall = dt.datetime.now(dt.UTC)

    def __repr__(self) -> str:
        return f"<SessionRegistry sessions={len(self.sessions)}>"

    async def create(self, model: NewSession) -> Session:
        launch.check_kernel_path(model.argv)
        if model.session_id in self.sessions:
            raise SessionExists(model.session_id)
        kept = self.store is not None and self.store.claim(model.session_id)
        session = self._new_session(model, kept=kept)
        self.sessions[model.session_id] = session
        await self._nursery.start(session.run)
        session.persist()
        log.info("session %s: created (%s, argv %s)", model.session_id, model.display_name,
                 model.argv)
        return session

    def _new_session(self, model: NewSession, *, kept: bool, key: str | None = None) -> Session:
        return Session(
            model,
            config=self.config,
            zmq_context=self.zmq_context,
            runtime_dir=self.runtime_dir,
            on_activity=self.on_activity,
            on_traffic=self.on_traffic,
            extra_env=self.extra_env,
            store=self.store if kept else None,
            key=key,
        )

    async def reattach_orphans(self) -> None:
        """Take over the sessions of dead daemons (their records are locked now), list them at
        once, and re-attach their kernels in the background; then keep our records fresh."""
        if self.store is None:
            return
        for orphan in self.store.orphans():
            model = orphan.record.session
            if model.session_id in self.sessions:
                continue  # cannot happen: ids are unique in a state dir
            session = self._new_session(model, kept=True, key=orphan.record.key)
            session.restore(orphan.record)
            self.sessions[model.session_id] = session
            await self._nursery.start(session.run)
            self._nursery.start_soon(durable.reattach, session, orphan,
                                     name=f"reattach {model.session_id}")
        self._nursery.start_soon(self._touch_records, name="touch records")

    async def _touch_records(self) -> None:
        assert self.store is not None
        while True:
            await trio.sleep_until(next_multiple(TOUCH_PERIOD))
            self.store.touch()

    def get(self, session_id: str, *, details: str | None = None) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotFound(session_id, details=details) from None

    def delete(self, session_id: str) -> None:
        session = self.get(session_id)
        # Unlike the reference, a session that never started can be deleted too.
        if session.kernel is not None and not session.kernel.exited.is_set():
            raise SessionRunning(session_id)
        del self.sessions[session_id]
        session.close()
        if self.store is not None:
            self.store.remove(session_id)
        log.info("session %s: deleted", session_id)

    async def shutdown_all(self) -> None:
        """Shut every kernel down (concurrently, each bounded), then end every session."""
        async with trio.open_nursery() as nursery:
            for session in list(self.sessions.values()):
                nursery.start_soon(session.shutdown)
        for session in self.sessions.values():
            session.close()
            # A deliberate shutdown leaves nothing to take over (only a crash does).
            if self.store is not None:
                self.store.remove(session.session_id)

    @property
    def any_busy(self) -> bool:
        return any(s.status == "busy" for s in self.sessions.values())

    @property
    def any_connected(self) -> bool:
        return any(s.client_attached for s in self.sessions.values())

    def status(self) -> ServerStatus:
        now = trio.current_time()
        sessions = list(self.sessions.values())
        busy = [s.state.busy_since for s in sessions if s.status == "busy"]
        idle = [
            s.state.idle_since
            for s in sessions
            if s.status != "busy" and s.state.idle_since is not None
        ]
        uptime = now - self.started_at
        if not sessions:
            idle_seconds = int(uptime)
        else:
            idle_seconds = int(now - max(idle)) if idle else 0
        return ServerStatus(
            sessions=len(sessions),
            active=sum(1 for s in sessions if s.status != "exited"),
            busy=bool(busy),
            idle_seconds=idle_seconds,
            busy_seconds=int(now - min(b for b in busy if b is not None)) if busy else 0,
            uptime_seconds=int(uptime),
            version=KALLICHORE_VERSION,
            process_id=os.getpid(),
            started=self.started_wall,
            server_id=self.config.server_id,
        )
