"""ProcessTreeSampler on a real process tree: the whole tree, or the kernel's own process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from kallichore_trio.kernel.resources import ProcessTreeSampler, descendants

# A parent that starts a child, says so, and both wait until stdin closes.
PARENT = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],"
    " stdin=subprocess.PIPE)\n"
    "print(child.pid, flush=True)\n"
    "sys.stdin.read()\n"
    "child.stdin.close(); child.wait()\n"
)


@pytest.fixture
def tree() -> Iterator[tuple[int, int]]:
    with subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None and parent.stdin is not None
        try:
            child = int(parent.stdout.readline())  # the child exists once this line came
            yield parent.pid, child
        finally:
            parent.stdin.close()
            parent.wait(10)


def test_the_tree_or_the_kernel_alone(tree: tuple[int, int]) -> None:
    parent, child = tree
    assert descendants(parent) == [parent, child]
    alone = ProcessTreeSampler(parent, include_children=False).sample(1000)
    whole = ProcessTreeSampler(parent).sample(1000)
    assert alone is not None and whole is not None
    own = psutil.Process(parent)
    child_threads = psutil.Process(child).num_threads()
    assert alone.thread_count == own.num_threads()
    assert whole.thread_count == own.num_threads() + child_threads
    assert whole.memory_bytes > alone.memory_bytes > 0

