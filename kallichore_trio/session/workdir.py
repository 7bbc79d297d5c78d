"""The session's working directory: where a kernel starts, and where a restart moves it.

The session reports the directory to the client (`workingDirChanged`) and follows the kernel's
own changes (`launch.process_cwd` after each execution); these decide the directory itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kallichore_trio.errors import ProcessStartFailed

log = logging.getLogger(__name__)


def start_directory(session_id: str, wanted: str) -> tuple[str, str | None]:
    """Where to start the kernel, and (when that is not `wanted`) the notice for the user.

    As the reference does: a project folder that was moved or deleted must still give the user
    a console, so the kernel starts in the daemon's own directory, and the client is told why
    (as kernel output, kept for a client not yet connected). ProcessStartFailed if the daemon's
    own directory is gone too.
    """
    if os.path.isdir(wanted):
        return wanted, None
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise ProcessStartFailed(
            f"the working directory '{wanted}' does not exist or is not a directory, "
            f"and neither does the daemon's ({exc})"
        ) from None
    log.warning("session %s: working directory %r does not exist or is not a "
                "directory; starting the kernel in %r", session_id, wanted, cwd)
    return cwd, (f"The working directory '{wanted}' does not exist or is not a directory; "
                 f"the kernel starts in '{cwd}' instead.\n")


def restart_directory(session_id: str, requested: str) -> str | None:
    """The directory a restart asked for, resolved; None (logged) if it is not one."""
    try:
        resolved = Path(requested).expanduser().resolve(strict=True)
    except OSError:
        resolved = None
    if resolved is not None and resolved.is_dir():
        return str(resolved)
    log.warning("session %s: restart working directory %r is not a directory; ignored",
                session_id, requested)
    return None
