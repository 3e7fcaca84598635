"""Child processes and the one reaper that owns every waitpid.

trio's own process API waits on its children by pid; a PID 1 must also reap orphans with
waitpid(-1), and the two race (the loser sees status 0). So children are spawned here with
subprocess.Popen in the trio thread, registered before the next checkpoint, and reaped only
by `Reaper.reap()`, which the SIGCHLD handler calls.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

import trio

from runner.log import log

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """When not PID 1, orphans of our children must still come to us."""
    if os.getpid() == 1:
        return
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Run in the child between fork and exec: SIGKILL it when the runner dies. As PID 1 the
    kernel does that for the whole pid namespace; when the runner is not PID 1 (a pod with
    shareProcessNamespace) nothing else would stop a QEMU left behind by a SIGKILLed runner.
    It survives exec; a parent already gone before the prctl is caught by the check."""

    def set_up() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(137)

    return set_up


def exit_code(status: int) -> int:
    """Shell-style exit code from a waitpid status: the code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


class Child:
    def __init__(self, name: str, popen: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.pid = popen.pid
        self._popen = popen
        self._done = trio.Event()
        self.status: int | None = None  # raw waitpid status once reaped

    @property
    def running(self) -> bool:
        return self.status is None

    @property
    def exit_code(self) -> int | None:
        return None if self.status is None else exit_code(self.status)

    def _reaped(self, status: int) -> None:
        self.status = status
        # Tell Popen it is over, so it never waits on a pid that may be reused.
        self._popen.returncode = exit_code(status)
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.status is not None
        return exit_code(self.status)

    def send_signal(self, sig: int) -> None:
        """Signal the child's process group (it leads one), unless it is already reaped: a
        reaped pid may belong to someone else by now."""
        if self.status is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, sig)

    async def stop(self, term_timeout: float, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or `sig`), then SIGKILL after `term_timeout` seconds; returns the code."""
        if self.status is None:
            self.send_signal(sig)
            with trio.move_on_after(term_timeout):
                return await self.wait()
            log.warning(
                "child-kill",
                child=self.name,
                pid=self.pid,
                reason=f"still running {term_timeout:g} s after {signal.Signals(sig).name}",
            )
            self.send_signal(signal.SIGKILL)
        return await self.wait()


class Reaper:
    def __init__(self) -> None:
        self.children: dict[int, Child] = {}
        self.orphans_reaped = 0
        self.restarts: collections.Counter[str] = collections.Counter()  # kept-alive children

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> Child:
        """Start a child in its own process group. Raises OSError if it cannot be executed."""
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            env=dict(env) if env is not None else None,
            process_group=0,
            close_fds=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        child = Child(name, popen)
        self.children[child.pid] = child
        log.debug("child-started", child=name, pid=child.pid)
        return child

    def reap(self) -> None:
        """Collect every exited child and orphan. SIGCHLDs coalesce, so loop until none."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                self.orphans_reaped += 1
                log.debug("orphan-reaped", pid=pid, code=exit_code(status))
                continue
            log.info("child-exited", child=child.name, pid=pid, code=exit_code(status))
            child._reaped(status)
