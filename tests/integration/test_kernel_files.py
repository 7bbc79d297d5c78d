"""What the daemon does with a kernel process it did not start or cannot pipe: the kernel's
output files (kernel/output.py: followed, and given back past a bound, whichever way the
filesystem allows) and the exit watch of a re-attached kernel (launch.wait_gone: a pidfd, or a
poll where there is none). Real child processes, real files; each way forced in turn."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from kallichore_trio.kernel import launch, output
from kallichore_trio.kernel.output import OutputFile, Trim
from kallichore_trio.state import ProcessRef

BOUND = 64 * 1024
#: Disk use allowed past the bound: the last read (64 KiB) and what the filesystem allocates
#: ahead for an appending writer (ext4 preallocation); still far under what was written.
SLACK = 256 * 1024
LINES = 20_000
WIDTH = 94


def writer(lines: int = LINES, width: int = WIDTH, pause_every: int = 0) -> str:
    """A program writing numbered lines to its stdout, one write each: `<i> ` and `width` x's.
    By default 2 MB in all, some thirty times the bound, as fast as it can; with
    `pause_every`, a short pause every so many lines, so a reader catches up now and then."""
    pause = f"    if i % {pause_every} == 0: time.sleep(0.0005)\n" if pause_every else ""
    return ("import os, time\n"
            f"for i in range({lines}):\n"
            f"    os.write(1, b'%d ' % i + b'x' * {width} + b'\\n')\n" + pause)


async def flood(tmp_path: Path, program: str | None = None
                ) -> tuple[list[bytes], OutputFile, Path]:
    """Run a writer as a kernel is run (launch.spawn: its stdout a file opened O_APPEND) and
    follow its stdout as the daemon does, with a small bound."""
    files = (tmp_path / "k.stdout", tmp_path / "k.stderr")
    process = await launch.spawn([sys.executable, "-c", program or writer()], {}, None, files)
    gone = trio.Event()
    lines: list[bytes] = []
    opened: list[OutputFile] = []
    async with trio.open_nursery() as nursery:
        async def watch() -> None:
            await process.wait()
            gone.set()

        nursery.start_soon(watch)
        with trio.fail_after(60):
            await output.follow(files[0], from_end=False, gone=gone, on_line=lines.append,
                                bound=BOUND, opened=opened.append)
    assert process.returncode == 0
    return lines, opened[0], files[0]


def numbers(lines: list[bytes], width: int = WIDTH) -> list[int]:
    """The writer's line numbers; each line must be one whole line as written."""
    found = [int(line.split(b" ", 1)[0]) for line in lines]
    for number, line in zip(found, lines, strict=True):
        assert line == b"%d " % number + b"x" * width + b"\n", line[:40]
    return found


def fail_for(modes: int) -> object:
    """A stand-in for output.fallocate that fails like a filesystem without `modes`."""
    real = output.fallocate

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if mode & modes:
            raise OSError(errno.EOPNOTSUPP, "not supported here (test)")
        real(fd, mode, offset, length)

    return fallocate


async def test_a_flooding_writer_loses_nothing_and_its_file_stays_small(
        tmp_path: Path) -> None:
    lines, followed, path = await flood(tmp_path)
    assert numbers(lines) == list(range(LINES))
    assert followed.trims > 0
    kept = path.stat()
    assert kept.st_blocks * 512 < BOUND + SLACK
    if followed.trim_method is Trim.COLLAPSE:  # ext4, XFS: the file itself shrinks
        assert kept.st_size < BOUND


async def test_without_collapse_the_read_part_is_punched_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "fallocate", fail_for(output.FALLOC_FL_COLLAPSE_RANGE))
    lines, followed, path = await flood(tmp_path)
    if followed.trim_method is not Trim.PUNCH:
        pytest.skip(f"this filesystem punches no holes either ({path})")
    assert numbers(lines) == list(range(LINES))
    assert followed.trims > 0
    kept = path.stat()
    assert kept.st_size >= 2 * 1000 * 1000  # nothing moved: a sparse file ...
    assert kept.st_blocks * 512 < BOUND + SLACK  # ... whose read part holds no disk


async def test_without_fallocate_the_file_is_emptied_once_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort: ftruncate when everything was read. A write between the size check
    and the truncation is lost (docs/durability.md), so this asserts only what always holds:
    no line twice, none out of order, none cut or glued to another, and a small file. The
    lines are long (several pages), so a read often ends inside a write still under way: the
    file must then not be truncated (output.py)."""
    monkeypatch.setattr(output, "fallocate",
                        fail_for(output.FALLOC_FL_COLLAPSE_RANGE | output.FALLOC_FL_PUNCH_HOLE))
    width = 20_000
    lines, followed, path = await flood(tmp_path, writer(500, width, pause_every=5))
    assert followed.trim_method is Trim.TRUNCATE
    seen = numbers(lines, width)
    assert seen == sorted(set(seen))
    assert followed.trims > 0
    assert path.stat().st_size < BOUND


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "poll"])
async def test_the_exit_of_a_process_that_is_not_ours_to_wait_for_is_seen(
        pidfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = trio.Event()
    real = launch.open_pidfd

    def open_pidfd(pid: int) -> int:
        asked.set()
        if not pidfd:
            raise OSError(errno.ENOSYS, "no pidfd here (test)")
        return real(pid)

    monkeypatch.setattr(launch, "open_pidfd", open_pidfd)
    if not pidfd:
        monkeypatch.setattr(launch, "EXIT_POLL", 0.05)
    # It runs until its stdin closes; nobody reaps it while it is watched (as for a kernel
    # of a dead daemon, whose parent is not us).
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        ref = ProcessRef.of(process.pid)
        assert ref is not None
        gone = trio.Event()
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                await launch.wait_gone(ref)
                gone.set()

            nursery.start_soon(watch)
            with trio.fail_after(10):
                await asked.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert not gone.is_set()  # it runs: nothing to see yet
            assert process.stdin is not None
            await process.stdin.aclose()
            with trio.fail_after(10):
                await gone.wait()
        assert not ref.alive()
        # A process already gone is seen at once, either way.
        with trio.fail_after(10):
            await launch.wait_gone(ref)
    finally:
        process.kill()
        await process.wait()
