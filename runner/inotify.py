"""inotify on one directory, as a trio async iterator of the names that changed."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import AsyncIterator

import trio


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
