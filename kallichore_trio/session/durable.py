"""A session's record on disk, and taking a session over from a daemon that died.

The session writes its record (state.py, `Session.persist`) whenever something a successor
would need changes: created, kernel started or restarted (with its kernel_info_reply), kernel
exited. A daemon that starts re-creates each orphaned session with its id, model and key
(`Session.restore`), and then `reattach`es its kernel if it still runs: a `Kernel` on the
existing process and ports (kernel.py, `attached`), asked for kernel_info on control (a kernel
running a cell answers there). It is also asked on shell, which a running cell holds: the
session is `busy` until that answer, or a status from the kernel, says otherwise. The client's
first frame says what happened (`supervisorRestarted`): what the kernel published while no
daemon listened is lost. See docs/durability.md.
"""

from __future__ import annotations

import logging

import trio

from kallichore_trio import wire
from kallichore_trio.errors import StartupFailure
from kallichore_trio.kernel.kernel import Kernel
from kallichore_trio.session.session import Session
from kallichore_trio.state import Orphan

log = logging.getLogger(__name__)

EXITED_UNSUPERVISED = "the kernel exited while no supervisor was running"


async def reattach(session: Session, orphan: Orphan) -> None:
    """Take the kernel of a dead daemon's session over, or list the session as exited. Runs
    in the registry's nursery: nothing may escape it but cancellation."""
    try:
        await _reattach(session, orphan)
    except Exception as exc:
        log.exception("session %s: re-attaching failed", session.session_id)
        session.set_status("exited", f"could not re-attach the kernel: {exc}")


async def _reattach(session: Session, orphan: Orphan) -> None:
    record = orphan.record
    session.emit(wire.supervisor_restarted_event(record.owner.server_id, int(orphan.gap * 1000)),
                 kept=True)
    ref = record.kernel
    if ref is None or record.connection is None or not ref.alive():
        log.info("session %s: taken over from daemon %s; its kernel is gone",
                 session.session_id, record.owner.server_id)
        session.set_status("exited", EXITED_UNSUPERVISED)
        session.forget_connection_file()
        session.persist()
        return
    log.info("session %s: re-attaching kernel pid %d left by daemon %s (%d ms without a "
             "supervisor)", session.session_id, ref.pid, record.owner.server_id,
             int(orphan.gap * 1000))
    async with session.lifecycle_lock:
        kernel = Kernel(session, session.kernel_params, info=record.connection, plan=None,
                        ports=None, attached=ref)
        session.kernel = kernel
        session.set_status("starting", "re-attaching after a supervisor restart")
        try:
            await session.start_kernel_task(kernel)
        except StartupFailure as exc:
            # Its cleanup has ended the process: it could not be reached.
            log.warning("session %s: could not re-attach kernel pid %d: %s",
                        session.session_id, ref.pid, exc)
            session.set_status("exited", f"could not re-attach the kernel: {exc}")
            session.persist()
            return
    if not kernel.shell_answered.is_set():
        await _settle_status(session, kernel)


async def _settle_status(session: Session, kernel: Kernel) -> None:
    """The session is `busy` by guess: the kernel may be running a cell the dead daemon sent.
    Wait for our kernel_info_request on shell to be answered (after that cell), then correct
    the guess, unless the kernel published a status since (core/state.py). Bounded by the
    incarnation: a kernel that ends, or is restarted, ends the wait."""
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, kernel.shell_answered)
        nursery.start_soon(wait, kernel.finished)
    due = session.state.after_shell_answer()
    if kernel.shell_answered.is_set() and session.kernel is kernel and due is not None:
        log.info("session %s: the re-attached kernel's shell answered", session.session_id)
        session.set_status(due, "kernel_info_reply")
