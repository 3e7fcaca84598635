"""kubelet's CPU manager state as the node sees it: the one reader, with one policy for a file
that is missing, unreadable or incomplete, and the one watch on it. The runner (embedded mode)
and the controller both use these; nobody else opens cpu_manager_state.

The policy: a state that cannot be read in full is *unknown*, whatever the reason (kubelet's
policy-change procedure deletes the file; a half-written or foreign file cannot be trusted).
Unknown never widens float: it is never taken to mean "every CPU is shared", because another
pod's exclusive CPUs would then run everything else. Callers keep float as it is (see
floatkeeper), and a start-up that would have to make float from it refuses.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import trio

from runner import kube
from runner.kube import KubeletState
from runner.log import log

STATE_FILE = "cpu_manager_state"


@attrs.frozen
class Unknown:
    """The state could not be read in full; `reason` is one line for the log."""

    reason: str


def read_state(kubelet_dir: str | Path) -> KubeletState | Unknown:
    path = Path(kubelet_dir) / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Unknown(f"{path} is missing")
    except (OSError, UnicodeDecodeError) as e:
        return Unknown(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    try:
        return kube.parse_cpu_manager_state(text)
    except kube.KubeError as e:
        return Unknown(f"{path}: {e}")


class DirWatch:
    """inotify on a directory: kubelet replaces cpu_manager_state by rename."""

    IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x8, 0x40, 0x80
    IN_CREATE, IN_DELETE, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0x200, 0o4000, 0o2000000
    IN_Q_OVERFLOW = 0x4000
    OVERFLOW = b"*"  # stands for "events were lost: assume anything changed"

    def __init__(self, directory: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = (
            self.IN_CLOSE_WRITE
            | self.IN_MOVED_TO
            | self.IN_MOVED_FROM
            | self.IN_CREATE
            | self.IN_DELETE
        )
        if libc.inotify_add_watch(self.fd, directory.encode(), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")

    async def changes(self) -> AsyncIterator[set[bytes]]:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            names: set[bytes] = set()
            offset = 0
            while offset + 16 <= len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                if mask & self.IN_Q_OVERFLOW:
                    names.add(self.OVERFLOW)
                # Bytes, not str: a file name need not be UTF-8.
                names.add(data[offset + 16 : offset + 16 + length].rstrip(b"\0"))
                offset += 16 + length
            yield names

    def close(self) -> None:
        os.close(self.fd)


async def watch_kubelet_state(
    kubelet_dir: str, on_change: Callable[[], None], resync: float
) -> None:
    """Calls `on_change` whenever cpu_manager_state may have changed (kubelet replaces it by
    rename). Never raises: without the watch, the caller's resync every `resync` s remains."""
    fallback = f"resync every {resync:g} s"  # the watch only hurries the caller
    try:
        watch = DirWatch(kubelet_dir)
    except OSError as e:
        log.warning("kubelet-dir-unwatched", dir=kubelet_dir, error=str(e), fallback=fallback)
        return
    try:
        async for names in watch.changes():
            if STATE_FILE.encode() in names or DirWatch.OVERFLOW in names:
                on_change()
    except Exception as e:  # losing the watch only slows the caller down to the resync pace
        log.error("kubelet-watch-failed", error=f"{type(e).__name__}: {e}", fallback=fallback)
    finally:
        watch.close()
