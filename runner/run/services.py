"""The long-lived helpers beside the guest: the anchor, dnsmasq per tap, virtiofsd per
share, the console forwarder. Each is started with `nursery.start` and returns only once it
is up; each cleans up after itself when its `Service` is stopped, shielded from the caller's
cancellation. A service's failure after start is logged and never takes the nursery down:
the reaper shares it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from runner import plumbing, spec
from runner.log import log
from runner.node import procfs
from runner.node.cgroupfs import CgroupError
from runner.procs import Child, Reaper


class Service:
    """A handle on a running service: `stop()` ends it and waits for its cleanup."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def launch(
    nursery: trio.Nursery, name: str, body: Callable[[trio.TaskStatus[Any]], Awaitable[None]]
) -> tuple[Service, Any]:
    """Run `body` as a service; returns once it called `task_status.started(value)`. A body
    that fails before that raises here; after that, its failure is only logged."""
    service = Service(name)
    up = [False]

    async def run(task_status: trio.TaskStatus[Any]) -> None:
        def started(value: Any = None) -> None:
            up[0] = True
            task_status.started(value)

        status: Any = _Status(started)
        try:
            with service.scope:
                await body(status)
        except Exception as e:
            if not up[0]:
                # A body's own nursery wraps its error: the caller wants the error itself.
                inner: BaseException = e
                while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
                    inner = inner.exceptions[0]
                raise inner from None
            log.error("service-failed", service=name, error=f"{type(e).__name__}: {e}")
        finally:
            service.done.set()

    value = await nursery.start(run)
    return service, value


class _Status:
    def __init__(self, started: Callable[[Any], None]) -> None:
        self.started = started


# The child stops itself before it becomes the program (same pid), so that it can be put in
# another cgroup by whoever may write there: the runner itself, or the node controller.
HOLD = 'kill -STOP $$ && exec "$@"'

Join = Callable[[int], Awaitable[None]]


async def spawn_joined(
    reaper: Reaper, name: str, argv: Sequence[str], join: Join, timeout: float = 10, **kw: Any
) -> Child:
    """A child that is in the container cgroup before it runs a single instruction of its
    program: started stopped, moved by `join`, then let go. What it allocates (QEMU's
    preallocated RAM) is charged to the pod. Raises OSError, or whatever `join` raises."""
    child = reaper.spawn(name, ["sh", "-c", HOLD, "sh", *argv], **kw)
    try:
        with trio.fail_after(timeout):
            while (state := _state(child.pid)) != "T":
                if not child.running or state in ("Z", ""):
                    raise OSError(f"{name} exited before it joined the container cgroup")
                await trio.sleep(0.005)
        await join(child.pid)
    except BaseException:
        with trio.CancelScope(shield=True):
            await child.stop(0, signal.SIGKILL)
        raise
    os.kill(child.pid, signal.SIGCONT)
    return child


def _state(pid: int) -> str:
    try:
        return procfs.read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


async def anchor(reaper: Reaper, join: Join, task_status: trio.TaskStatus[list[Child]]) -> None:
    """systemd removes a scope with no process in it: something must stay behind, and must
    be put back if it dies. Started while we are still in the container cgroup; a new one,
    started from float, joins the container cgroup itself. Reports a one-item list that
    always holds the current anchor."""
    current = [reaper.spawn("anchor", ["sleep", "infinity"])]
    task_status.started(current)
    delay = 0.1
    try:
        while True:
            log.warning("anchor-died", code=await current[0].wait())
            if not await _respawn(reaper, join, current):
                return
            reaper.restarts["anchor"] += 1
            log.info("anchor-restarted", pid=current[0].pid)
            await trio.sleep(delay)  # an anchor that keeps dying is not a busy loop
            delay = min(delay * 2, 10.0)
    finally:
        with trio.CancelScope(shield=True):
            await current[0].stop(2)


async def _respawn(reaper: Reaper, join: Join, current: list[Child]) -> bool:
    """A new anchor in the container cgroup, retried while fork fails; False once the
    container cgroup is gone (or will not take it)."""
    delay = 0.1
    while True:
        try:
            current[0] = await spawn_joined(reaper, "anchor", ["sleep", "infinity"], join)
            return True
        except OSError as e:  # no fork now (a storm of processes)
            log.error("anchor-restart-failed", error=e.strerror or str(e), retry=delay)
        except CgroupError as e:
            log.error(
                "container-cgroup-gone",
                error=str(e),
                detail="removed with its last process; the instance runs on",
            )
            return False
        await trio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def dnsmasq(
    reaper: Reaper, name: str, argv: list[str], task_status: trio.TaskStatus[None]
) -> None:
    """DHCP for one tap, restarted with backoff if it dies; up once the first one stays up."""
    await plumbing.supervise_dnsmasq(reaper, name, argv, on_up=task_status.started)


async def passt(
    reaper: Reaper, name: str, argv: list[str], fd: int, task_status: trio.TaskStatus[Child]
) -> None:
    """A nic's passt on its end of a socketpair (`fd`, QEMU has the other): up once started.
    Reports the child: the guest's network depends on it, so the supervisor watches it."""
    async with trio.open_nursery() as nursery:
        try:
            child = plumbing.spawn_logged(reaper, nursery, name, argv, pass_fds=(fd,))
        except OSError as e:
            raise plumbing.PlumbingError(f"cannot start {argv[0]}: {e.strerror}") from None
        await _hold(child, nursery, task_status)


async def _hold(child: Child, nursery: trio.Nursery, task_status: trio.TaskStatus[Child]) -> None:
    """Report the child and keep it until cancelled; then stop it, and its output readers."""
    try:
        task_status.started(child)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await child.stop(2)
        nursery.cancel_scope.cancel()


async def socket_daemon(
    reaper: Reaper,
    name: str,
    argv: list[str],
    socket_path: str,
    task_status: trio.TaskStatus[Child],
) -> None:
    """A share's virtiofsd; up once its socket exists. Reports the child: the guest depends
    on it, so the supervisor watches it."""
    Path(socket_path).unlink(missing_ok=True)
    try:
        async with trio.open_nursery() as nursery:
            child = await plumbing.start_socket_daemon(
                reaper, nursery, name, argv, socket_path, timeout=10
            )
            await _hold(child, nursery, task_status)
    finally:
        Path(socket_path).unlink(missing_ok=True)


async def console(fd: int, the_spec: spec.InstanceSpec, task_status: trio.TaskStatus[None]) -> None:
    """The guest's serial console, a line at a time, to stdout and the log file."""
    log_file = None
    if the_spec.console.log_file:
        try:
            log_file = open(the_spec.console.log_file, "a", buffering=1)  # noqa: SIM115
        except OSError as e:
            log.warning("console-log-unavailable", path=the_spec.console.log_file, error=e.strerror)

    def on_line(line: str) -> None:
        if the_spec.console.stdout:
            print(f"[{the_spec.name}] {line}", flush=True)
        if log_file is not None:
            log_file.write(line + "\n")

    task_status.started()
    try:
        await plumbing.forward_lines(fd, on_line)
    finally:
        if log_file is not None:
            log_file.close()
