"""Writes of a PID or TID that another party controls, made only while that number provably
names the process or thread that was checked.

A PID is reused once its process is reaped. So every such write is bracketed: a pidfd of the
process is opened, the identity is checked under it, the write is made, and the pidfd must
still show the process alive afterwards (a live process keeps its PID: the write reached it).
A thread is named by its process's pidfd and its start time, read before and after. Before the
write, a mismatch is `Gone` (nothing written); after it, `Raced`: the caller undoes what it
wrote, since the write may have reached a process that took the number.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from runner.node import procfs


class Gone(OSError):
    """The process or thread is not the one checked: nothing was written."""


class Raced(OSError):
    """It went away while it was written: the write may have reached another."""


@contextlib.contextmanager
def process(pid: int, check: Callable[[], bool] = lambda: True) -> Iterator[int]:
    """Inside: `pid` is the process `check` approved, and stays it (yields its pidfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        raise Gone(f"process {pid} is gone") from None
    try:
        if procfs.exited(pidfd) or not check():
            raise Gone(f"process {pid} is gone or not the one checked")
        yield pidfd
        if procfs.exited(pidfd):
            raise Raced(f"process {pid} exited while it was written")
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def thread(
    pid: int, tid: int, started: int | None = None, check: Callable[[], bool] = lambda: True
) -> Iterator[None]:
    """Inside: `tid` is that thread of process `pid` (started at `started`, when known), and
    stays it."""
    with process(pid):
        before = procfs.start_time(pid, tid)
        if before is None or (started is not None and before != started) or not check():
            raise Gone(f"thread {tid} of {pid} is gone or not the one checked")
        yield
        if procfs.start_time(pid, tid) != before:
            raise Raced(f"thread {tid} of {pid} exited while it was written")


def parent_cgroup(pid: int) -> str | None:
    """Where a process that took a reused PID most likely was: its parent's cgroup (a fork
    starts in its parent's). None when that cannot be read."""
    try:
        return procfs.cgroup(procfs.stat(pid).ppid) or None
    except OSError:
        return None
