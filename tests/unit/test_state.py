"""Session records (state.py): round trip, atomic 0600 writes, locks, orphans, bad records."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kallichore_trio import state
from kallichore_trio.kernel.connection import connection_info
from kallichore_trio.models import NewSession, VarAction
from kallichore_trio.state import Owner, ProcessRef, RecordStore, SessionRecord


def model(session_id: str = "s-1") -> NewSession:
    return NewSession(
        session_id=session_id, display_name="Python", language="python", username="me",
        input_prompt="In: ", continuation_prompt="...", argv=["python", "-m", "ipykernel"],
        working_directory="/tmp", env=[VarAction("replace", "A", "b")],
        interrupt_mode="signal", protocol_version="5.3",
    )


def me() -> Owner:
    ref = ProcessRef.of(os.getpid())
    assert ref is not None
    return Owner(process=ref, server_id="server-a")


def dead_owner() -> Owner:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = ProcessRef.of(proc.pid)
    proc.wait()
    assert ref is not None and not ref.alive()
    return Owner(process=ref, server_id="server-dead")


def record(session_id: str = "s-1", owner: Owner | None = None) -> SessionRecord:
    return SessionRecord(
        session=model(session_id), key="k" * 32, owner=owner or me(),
        created=dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC), working_directory="/tmp",
        env=[VarAction("append", "PATH", ":/x")],
        connection=connection_info({"control_port": 1, "shell_port": 2, "stdin_port": 3,
                                    "hb_port": 4, "iopub_port": 5}, "k" * 32),
        kernel=ProcessRef(pid=1234, start_time=1.5e9), connection_file="/run/c.json",
        kernel_info={"language_info": {"name": "python"}, "status": "ok"},
    )


def test_round_trip() -> None:
    original = record()
    assert state.loads(state.dumps(original)) == original
    bare = SessionRecord(session=model(), key="k", owner=me(), created=original.created,
                         working_directory="/", env=[])
    assert state.loads(state.dumps(bare)) == bare


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"format": 99}', b'{"format": 1}',
                                 b'{"format": 1, "session": 3, "key": "k"}'])
def test_loads_refuses_what_is_not_a_record(raw: bytes) -> None:
    with pytest.raises(ValueError):
        state.loads(raw)


def test_file_stems_are_safe_and_distinct() -> None:
    assert "/" not in state.file_stem("../../etc/passwd")
    assert state.file_stem("a/b") != state.file_stem("a_b")
    assert state.file_stem("python-123").startswith("python-123-")


def test_write_atomic_replaces_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    state.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_prepare_state_dir(tmp_path: Path) -> None:
    target = tmp_path / "a" / "state"
    state.prepare_state_dir(target)
    assert target.stat().st_mode & 0o777 == 0o700
    assert list(target.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(state.StateDirError, match=str(blocker)):
        state.prepare_state_dir(blocker / "state")


def test_store_writes_locks_and_removes(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, me())
    store.write(record())  # not claimed: nothing written
    assert list(tmp_path.iterdir()) == []
    assert store.claim("s-1")
    store.write(record(owner=dead_owner()))
    path = store.paths("s-1")[0]
    assert state.loads(path.read_bytes()).owner == me()  # the store writes itself as owner
    assert path.stat().st_mode & 0o777 == 0o600
    # Another store (another daemon) can neither claim nor take it while it is held.
    other = RecordStore(tmp_path, me())
    assert not other.claim("s-1")
    assert list(other.orphans()) == []
    store.remove("s-1")
    assert list(tmp_path.iterdir()) == []


def test_orphans_are_taken_once_and_bad_records_moved_aside(tmp_path: Path) -> None:
    dead = RecordStore(tmp_path, dead_owner())
    for sid in ("a", "b"):
        assert dead.claim(sid)
        dead.write(record(sid))
    dead.release_all()  # what the kernel does when the daemon dies
    live = RecordStore(tmp_path, me())
    assert live.claim("c")
    live.write(record("c"))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / f"{state.file_stem('x')}.json").write_bytes(state.dumps(record("y")))

    first = RecordStore(tmp_path, me())
    taken = sorted(o.record.session.session_id for o in first.orphans())
    assert taken == ["a", "b"]
    assert sorted(p.name for p in tmp_path.glob("*.bad")) == [
        "junk.json.bad", f"{state.file_stem('x')}.json.bad"]
    assert not (tmp_path / "junk.lock").exists()
    # A second daemon now finds nothing to take: the first holds them, and "c" is live.
    assert list(RecordStore(tmp_path, me()).orphans()) == []


def test_a_live_owner_without_a_lock_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / f"{state.file_stem('s-1')}.json"
    path.write_bytes(state.dumps(record(owner=me())))
    assert list(RecordStore(tmp_path, me()).orphans()) == []
    assert path.exists()


def test_process_ref_tells_a_reused_pid() -> None:
    ref = ProcessRef.of(os.getpid())
    assert ref is not None and ref.alive()
    assert not ProcessRef(pid=ref.pid, start_time=ref.start_time - 100).alive()
