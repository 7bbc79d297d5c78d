"""A kernel's stdout or stderr file in the state directory: followed, and kept small.

The kernel writes to the file (opened with O_APPEND by `launch.spawn`, so every write lands at
the file's end, wherever that is now); the daemon reads what was appended and passes it on line
by line (`follow`). A kernel that prints without end to its own stdout would grow the file
without end, so once `OUTPUT_FILE_BOUND` bytes have been read, what was read is given back
(`OutputFile.trim`), by the first of these the filesystem supports:

1. Collapse the read part (`fallocate(FALLOC_FL_COLLAPSE_RANGE)`, ext4 and XFS): the file loses
   its first blocks and everything after them moves down. The kernel's appending writes and
   the collapse both hold the file's inode lock, so a write lands either before the collapse
   (and moves down with the rest) or after it (at the new end): nothing is lost, and the file
   stays under the bound plus what is not read yet.
2. Punch the read part out (`FALLOC_FL_PUNCH_HOLE`, also tmpfs and Btrfs): its disk blocks are
   freed and nothing moves, so nothing is lost either; the file's apparent size keeps growing
   (a sparse file), its disk use does not.
3. Elsewhere (no `fallocate`: macOS, some network filesystems), empty the file once everything
   in it was read and it ends with a whole line: `ftruncate(0)` when its size equals our read
   offset. That is two system calls, and a write that lands between them is lost: the one race
   left, documented in docs/durability.md. (The whole line matters: a reader may see the first
   pages of a write still under way, and a truncation then would keep that write's head and
   lose its tail, gluing the head to the next line.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import trio

from kallichore_trio.timers import next_multiple

log = logging.getLogger(__name__)

#: A line longer than this without a newline is passed on in pieces.
MAX_LINE = 64 * 1024
#: How often an output file is looked at: soon after output, less often the longer it is quiet.
FOLLOW_FIRST = 0.01
FOLLOW_MAX = 0.5
#: What is read of an output file is given back to the filesystem once it is this large.
OUTPUT_FILE_BOUND = 8 * 1024 * 1024
_READ_SIZE = 65536

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08


class Trim(enum.Enum):
    """How read output is given back; an output file moves down the list when one fails."""

    COLLAPSE = "collapse"
    PUNCH = "punch"
    TRUNCATE = "truncate"


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_fallocate_function = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError when it fails or there is none (ENOSYS)."""
    if _fallocate_function is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate_function(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def split_lines(pending: bytes, on_line: Callable[[bytes], None]) -> bytes:
    """Pass on every whole line (or MAX_LINE piece) of `pending`; return the rest."""
    while (cut := pending.find(b"\n")) >= 0 or len(pending) > MAX_LINE:
        end = cut + 1 if cut >= 0 else MAX_LINE
        on_line(pending[:end])
        pending = pending[end:]
    return pending


class OutputFile:
    """The daemon's end of one output file: what it has read (`offset`), and what of that it
    has given back (`freed`, for hole punching; a collapse or a truncation moves `offset`)."""

    def __init__(self, fd: int, *, bound: int = OUTPUT_FILE_BOUND,
                 trim: Trim = Trim.COLLAPSE) -> None:
        self.fd = fd
        self.bound = bound
        self.trim_method: Trim | None = trim
        self.offset = os.lseek(fd, 0, os.SEEK_CUR)
        self.freed = 0
        #: Times read output was given back (read by tests and docs/performance.md).
        self.trims = 0

    def skip_to_end(self) -> None:
        self.offset = os.lseek(self.fd, 0, os.SEEK_END)

    def read(self) -> bytes:
        chunk = os.read(self.fd, _READ_SIZE)
        self.offset += len(chunk)
        return chunk

    @property
    def due(self) -> bool:
        return self.offset - self.freed >= self.bound

    def trim(self, *, caught_up: bool) -> None:
        """Give back what was read, if it is over the bound. `caught_up`: the last read found
        nothing more and no partial line is pending (only then may a truncation be tried)."""
        while self.due and self.trim_method is not None:
            method = self.trim_method
            try:
                if method is Trim.COLLAPSE:
                    self._collapse()
                elif method is Trim.PUNCH:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.freed,
                              self.offset - self.freed)
                    self.freed = self.offset
                    self.trims += 1
                elif caught_up:
                    self._truncate()
                return
            except OSError as exc:
                self.trim_method = (Trim.PUNCH if method is Trim.COLLAPSE else
                                    Trim.TRUNCATE if method is Trim.PUNCH else None)
                log.debug("output file: %s failed (%s); trying %s", method.value, exc,
                          self.trim_method.value if self.trim_method else "nothing more")
                if self.trim_method is None:
                    log.warning("a kernel's output file cannot be trimmed (%s); it grows until "
                                "the kernel restarts", exc)

    def _collapse(self) -> None:
        # Whole blocks only, and never up to the file's end (both are the call's rules): the
        # range ends a block short of our offset at most, which is never past the end.
        block = os.fstat(self.fd).st_blksize or 4096
        length = (self.offset - 1) // block * block
        if length <= 0:
            return
        fallocate(self.fd, FALLOC_FL_COLLAPSE_RANGE, 0, length)
        self.offset -= length
        os.lseek(self.fd, self.offset, os.SEEK_SET)
        self.trims += 1

    def _truncate(self) -> None:
        if os.fstat(self.fd).st_size != self.offset:
            return  # written since our last read: read it first, truncate another time
        # The race: a write between the fstat above and this truncation is lost.
        os.ftruncate(self.fd, 0)
        self.offset = self.freed = 0
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.trims += 1


async def follow(path: Path, *, from_end: bool, gone: trio.Event,
                 on_line: Callable[[bytes], None], bound: int = OUTPUT_FILE_BOUND,
                 opened: Callable[[OutputFile], None] = lambda _: None) -> None:
    """Pass on what the kernel appends to the file at `path`, until `gone` is set and the
    file is read to its end. Polled: sooner after output, rarely while it is quiet. Raises
    OSError when the file cannot be opened. `opened` is told of the file (tests)."""
    # Read and write: trimming needs a writable descriptor; we never write.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        output = OutputFile(fd, bound=bound)
        opened(output)
        if from_end:
            output.skip_to_end()  # what was written while nobody followed is lost
        pending = b""
        wait = FOLLOW_FIRST
        while True:
            chunk = output.read()
            if chunk:
                pending = split_lines(pending + chunk, on_line)
                if output.due:
                    output.trim(caught_up=False)
                wait = FOLLOW_FIRST
                await trio.lowlevel.checkpoint()
                continue
            if output.due:
                # A partial line pending may be a write still under way (a reader can see the
                # first pages of a write before the rest): not caught up with it.
                output.trim(caught_up=not pending)
            if gone.is_set():
                break
            # Once quiet, on the shared grid (timers.py): every session's followers then
            # wake in one scheduler round instead of one round each.
            deadline = (next_multiple(FOLLOW_MAX) if wait >= FOLLOW_MAX
                        else trio.current_time() + wait)
            with trio.move_on_at(deadline):
                await gone.wait()
            wait = min(wait * 2, FOLLOW_MAX)
        if pending:
            on_line(pending)
    finally:
        os.close(fd)
