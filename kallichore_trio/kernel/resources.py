"""CPU, memory and threads of a kernel's whole process tree, sampled cheaply with psutil.

Cheap means no walk of all of /proc per sample (a Positron complaint about the reference on
big hosts): a kernel's descendants are found through /proc/<pid>/task/<tid>/children, which
lists one process's children directly, and the tree is re-discovered only every few samples.
psutil.Process objects are kept between samples so that `cpu_percent()` measures the CPU used
since the previous sample (100 = one core fully busy).
"""

from __future__ import annotations

import os
import time

import psutil

from kallichore_trio.models import ResourceUsage

#: Re-discover each tree every this many samples (new children are picked up then).
RESCAN_EVERY = 5


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(_children(pid))
    return pids


class ProcessTreeSampler:
    """Samples one kernel's process tree (or, with `include_children` false, the kernel's own
    process only); keep one per kernel pid."""

    def __init__(self, root: int, *, include_children: bool = True) -> None:
        self.root = root
        self.include_children = include_children
        self._procs: dict[int, psutil.Process] = {}
        self._samples = 0

    def __repr__(self) -> str:
        return f"<ProcessTreeSampler root={self.root} processes={len(self._procs)}>"

    def _refresh(self) -> None:
        pids = descendants(self.root) if self.include_children else [self.root]
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]
        for pid in pids:
            if pid not in self._procs:
                try:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # the first reading only sets the baseline
                except psutil.Error:
                    continue
                self._procs[pid] = proc

    def sample(self, period_ms: int) -> ResourceUsage | None:
        """The tree's usage since the last sample; None once the root process is gone."""
        if self._samples % RESCAN_EVERY == 0:
            self._refresh()
        self._samples += 1
        if self.root not in self._procs:
            return None
        cpu = 0.0
        memory = threads = 0
        for pid, proc in list(self._procs.items()):
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    memory += proc.memory_info().rss
                    threads += proc.num_threads()
            except psutil.Error:
                del self._procs[pid]
        return ResourceUsage(
            cpu_percent=round(cpu),
            memory_bytes=memory,
            thread_count=threads,
            sampling_period_ms=period_ms,
            timestamp=int(time.time() * 1000),
        )
