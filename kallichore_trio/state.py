"""Session records: what a daemon keeps on disk so that another daemon can take its kernels over.

One record per session in the state directory (docs/durability.md), written atomically (a
temporary file in the same directory, then `os.replace`) with mode 0600: it holds the kernel's
HMAC key. Next to each record, a lock file that the owning daemon holds (`fcntl.flock`) for as
long as it keeps the session: the kernel releases the lock when the daemon dies, however it
dies, so a daemon that can lock a record knows its owner is gone. A daemon that starts takes
the records it can lock whose owner process is not alive (`RecordStore.orphans`).

Files per session (`<stem>` is the session id made safe for a file name, plus a hash):

    <stem>.json     the record (SessionRecord as JSON)
    <stem>.lock     held by the owning daemon
    <stem>.stdout   the kernel's stdout and stderr, which the daemon follows (kernel.py)
    <stem>.stderr
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import cattrs
import psutil

from kallichore_trio.models import ConnectionInfo, NewSession, VarAction, converter

log = logging.getLogger(__name__)

#: Bumped when a record changes in a way an older daemon could not read. A record of another
#: format is moved aside, not guessed at.
FORMAT = 1
#: How often a daemon touches its records, so that their age says when it was last alive.
TOUCH_PERIOD = 5.0


class StateDirError(Exception):
    """The state directory cannot be created or written."""


@attrs.frozen(kw_only=True)
class ProcessRef:
    """A process, named so that a reused pid is never mistaken for it."""

    pid: int
    #: psutil's create_time(): seconds since the epoch.
    start_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        try:
            return cls(pid=pid, start_time=psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def alive(self) -> bool:
        """The same process is still running (pid and start time both match)."""
        try:
            proc = psutil.Process(self.pid)
            return (abs(proc.create_time() - self.start_time) < 0.01
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False


@attrs.frozen(kw_only=True)
class Owner:
    """The daemon that keeps a session."""

    process: ProcessRef
    server_id: str


@attrs.frozen(kw_only=True)
class SessionRecord:
    format: int = FORMAT
    #: The PUT /sessions body, as given.
    session: NewSession
    key: str
    owner: Owner
    created: dt.datetime
    working_directory: str
    #: The environment actions of the last restart (the session's own otherwise).
    env: list[VarAction]
    #: The kernel's ports, once known.
    connection: ConnectionInfo | None = None
    #: The running kernel process; None once it exited (or before it started).
    kernel: ProcessRef | None = None
    #: The kernel's connection file, removed when the session ends.
    connection_file: str | None = None
    kernel_info: dict[str, Any] = attrs.field(factory=dict)
    #: Sequence numbers up to this one may have been sent to a client: a successor numbers
    #: its frames above it (docs/durability.md, resume).
    seq_reserved: int = 0


def dumps(record: SessionRecord) -> bytes:
    return json.dumps(converter.unstructure(record), indent=1).encode()


def loads(raw: bytes) -> SessionRecord:
    """The record in `raw`; ValueError when it is not one of ours (or of another format)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a session record of format {FORMAT}")
    try:
        return converter.structure(data, SessionRecord)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"not a valid session record: {exc!r}") from None


def file_stem(session_id: str) -> str:
    """A file name for any session id: readable part plus a hash, so two ids never share one."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in session_id)[:60]
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:12]
    return f"{safe}-{digest}"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (0600) so that a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def prepare_state_dir(path: Path) -> None:
    """Create the state directory (0700) and check it can be written; StateDirError if not."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = path / f".probe-{os.getpid()}"
        write_atomic(probe, b"")
        probe.unlink()
    except OSError as exc:
        raise StateDirError(f"the state directory '{path}' cannot be used: {exc}") from exc


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on `path` (created 0600), or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by kernels (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _drop_lock(path: Path, fd: int) -> None:
    """Remove a lock file we hold for a record that is no more, then let go of it."""
    try:
        path.unlink()
    except OSError:
        pass
    os.close(fd)


@attrs.frozen
class Orphan:
    """A record taken over from a dead daemon; `gap` is seconds since its owner last wrote or
    touched it."""

    record: SessionRecord
    gap: float


class RecordStore:
    """The records of this daemon's sessions, each locked while the session lives."""

    def __init__(self, directory: Path, owner: Owner) -> None:
        self.directory = directory
        self.owner = owner
        self._locks: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<RecordStore {self.directory} sessions={len(self._locks)}>"

    def paths(self, session_id: str) -> tuple[Path, Path, Path]:
        """The record, and the kernel's stdout and stderr files."""
        stem = self.directory / file_stem(session_id)
        return (stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".stdout"),
                stem.with_name(stem.name + ".stderr"))

    def _lock_path(self, session_id: str) -> Path:
        return self.directory / f"{file_stem(session_id)}.lock"

    def claim(self, session_id: str) -> bool:
        """Lock a new session's record; False if another daemon holds one by that id."""
        if session_id in self._locks:
            return True
        fd = _try_lock(self._lock_path(session_id))
        if fd is None:
            log.warning("session %s: another daemon keeps a session by this id in %s; this one "
                        "will not survive a crash", session_id, self.directory)
            return False
        self._locks[session_id] = fd
        return True

    def write(self, record: SessionRecord) -> None:
        session_id = record.session.session_id
        if session_id not in self._locks:
            return
        try:
            write_atomic(self.paths(session_id)[0], dumps(attrs.evolve(record, owner=self.owner)))
        except OSError as exc:
            log.error("session %s: could not write its record: %s", session_id, exc)

    def remove(self, session_id: str) -> None:
        """Forget a session: its record and output files, then its lock."""
        fd = self._locks.pop(session_id, None)
        if fd is None:
            return
        for path in self.paths(session_id):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
        try:
            self._lock_path(session_id).unlink()
        except OSError:
            pass
        os.close(fd)

    def touch(self) -> None:
        """Mark every record as kept by a live daemon (their mtime is the owner's last sign of
        life, for `gap_ms` after a crash)."""
        for session_id in list(self._locks):
            try:
                os.utime(self.paths(session_id)[0])
            except OSError:
                pass

    def orphans(self) -> Iterator[Orphan]:
        """Take every record whose owner is dead: lock it and yield it. A record that is not
        ours to read is moved aside (`*.bad`) and skipped; a live owner's is left alone."""
        for path in sorted(self.directory.glob("*.json")):
            lock = path.with_suffix(".lock")
            fd = _try_lock(lock)
            if fd is None:
                continue  # its owner is alive and holds it
            try:
                try:
                    raw = path.read_bytes()
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    _drop_lock(lock, fd)  # removed meanwhile by its owner
                    continue
                try:
                    record = loads(raw)
                    if path.name != file_stem(record.session.session_id) + ".json":
                        raise ValueError("its file name does not match its session id")
                except ValueError as exc:
                    log.error("state: %s is not a usable session record (%s); moved aside "
                              "to %s.bad", path, exc, path.name)
                    os.replace(path, path.with_name(path.name + ".bad"))
                    _drop_lock(lock, fd)
                    continue
                if record.owner.process.alive():
                    log.warning("state: %s belongs to a live daemon (pid %d) that does not "
                                "lock it; left alone", path, record.owner.process.pid)
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            self._locks[record.session.session_id] = fd
            yield Orphan(record, max(0.0, time.time() - mtime))

    def release_all(self) -> None:
        """Let go of every lock without removing anything (the daemon is ending abnormally)."""
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()
