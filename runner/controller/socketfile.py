"""The controller's Unix socket as a file it alone owns. Every VM pod on the node connects to
it, so whoever could replace it would answer them all: the directory is made root's and 0755
(pods mount it read-only: connect needs no write access), a socket that is removed or replaced
is noticed and bound again, and a stale file at the path is moved aside rather than a reason
not to start."""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from pathlib import Path

import trio

from runner.log import log

BACKLOG = 512


class SocketError(Exception):
    """The socket cannot be served; one line for the operator."""


class SocketFile:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.ino: int | None = None  # the inode of the socket we bound

    def own_directory(self) -> None:
        """The directory exists (made 0755); one that others may write is named in a
        warning, and left as it is (it may be shared, like /tmp)."""
        d = self.path.parent
        try:
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            st = os.stat(d)
        except OSError as e:
            raise SocketError(f"cannot create {d}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise SocketError(f"{d} is not a directory")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            log.warning(
                "socket-directory-shared",
                directory=str(d),
                owner=st.st_uid,
                mode=stat.filemode(st.st_mode),
                detail="whoever may write it can replace the socket every VM pod connects to: "
                "make it the controller's, 0755, and mount it read-only in VM pods",
            )

    def _clear(self, takeover: bool) -> None:
        """Whatever is at the path goes: a live controller's socket is refused at start
        (`takeover` False), anything else is removed, or moved aside when it is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            aside = self.path.with_name(f"{self.path.name}.stale-{int(time.time())}")
            os.replace(self.path, aside)
            log.warning(
                "socket-path-moved-aside",
                path=str(self.path),
                to=str(aside),
                was=stat.filemode(st.st_mode),
            )
            return
        if not takeover:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise SocketError(f"another controller is serving on {self.path}")
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise SocketError(f"cannot probe {self.path}: {e.strerror}") from None
            finally:
                probe.close()
        self.path.unlink(missing_ok=True)  # left by a controller that died, or not ours

    async def bind(self, takeover: bool = False) -> trio.SocketListener:
        self.own_directory()
        try:
            self._clear(takeover)
        except OSError as e:
            raise SocketError(f"cannot clear {self.path}: {e.strerror}") from None
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # the socket is born 0660: no window with a wider mode
        try:
            await sock.bind(str(self.path))
            sock.listen(BACKLOG)
            self.ino = os.lstat(self.path).st_ino
        except OSError as e:
            sock.close()
            hint = " (at most 107 bytes)" if len(str(self.path).encode()) > 107 else ""
            raise SocketError(f"cannot serve on {self.path}: {e.strerror or e}{hint}") from None
        finally:
            os.umask(old)
        return trio.SocketListener(sock)

    def changed(self) -> str | None:
        """Why the path no longer leads to our socket, or None while it does."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return "removed"
        except OSError as e:
            return f"unreadable ({e.strerror})"
        if st.st_ino != self.ino or not stat.S_ISSOCK(st.st_mode):
            return "replaced"
        return None

    def remove(self) -> None:
        """At exit: ours alone is removed."""
        if self.ino is not None and self.changed() is None:
            self.path.unlink(missing_ok=True)
