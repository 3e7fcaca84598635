"""Who is on the other end: refused, not guessed, when the kernel cannot prove it."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from runner.controller import identity


class Kernel:
    """A real socket whose SO_PEERPIDFD answers as a given kernel would."""

    def __init__(self, sock: socket.socket, err: int | None) -> None:
        self.sock, self.err = sock, err

    def getsockopt(self, level: int, name: int, *size: int) -> object:
        if name == identity.SO_PEERPIDFD and self.err is not None:
            raise OSError(self.err, "as the kernel says")
        return self.sock.getsockopt(level, name, *size)


@pytest.fixture
def pair() -> Iterator[socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a
    a.close()
    b.close()


def test_a_kernel_without_peerpidfd_falls_back_to_pid_and_start_time(pair: socket.socket) -> None:
    peer = identity.identify(Kernel(pair, errno.ENOPROTOOPT))  # type: ignore[arg-type]
    assert peer.how == "pid and start time" and peer.pid and peer.pidns is not None


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ESRCH, errno.ENOMEM, errno.EMFILE])
def test_any_other_failure_is_refused(pair: socket.socket, err: int) -> None:
    # EINVAL: 6.5 to 6.15 for a peer already reaped, whose pid may be another pod's now.
    peer = identity.identify(Kernel(pair, err))  # type: ignore[arg-type]
    assert peer.pod is None and peer.pidns is None and peer.how.startswith("peer gone")
