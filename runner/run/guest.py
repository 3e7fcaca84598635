"""QEMU: started paused with QMP on a socketpair, watched, and stopped by the ladder
power button → `quit` → SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import time

import trio

from runner.argv import Wiring, qemu_argv
from runner.log import log
from runner.node import procfs
from runner.node.cgroupfs import CgroupError
from runner.plumbing import forward_lines
from runner.procs import Child, Reaper
from runner.qmp import QMP, QMPError
from runner.run import services
from runner.run.options import StartupError
from runner.run.preflight import Prepared

# How the guest ended when we stopped it: the exit code says which step it took.
EXIT_POWERED_OFF, EXIT_QUIT, EXIT_KILLED = 0, 124, 137
# After the guest's shutdown timeout: this long for QEMU to `quit`, then SIGKILL. Stopping takes
# at most shutdown-timeout + QUIT_GRACE + a second: keep the pod's grace period above that.
QUIT_GRACE = 3.0
# QMP events that change the guest's state (query-status's names).
EVENT_STATES = {
    "STOP": "paused",
    "RESUME": "running",
    "SHUTDOWN": "shutdown",
    "GUEST_PANICKED": "guest-panicked",
}


def since_exec() -> float:
    """Seconds since this process was started (its exec, as /proc/self/stat counts it)."""
    start_ticks = int(procfs.read("/proc/self/stat").rsplit(")", 1)[1].split()[19])
    boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot_now - start_ticks / os.sysconf("SC_CLK_TCK")


class Guest:
    """One QEMU process and its QMP connection."""

    def __init__(self, pre: Prepared, shutdown_timeout: float) -> None:
        self.pre = pre
        self.shutdown_timeout = shutdown_timeout
        self.qmp = QMP(pre.spec.name)
        self.qemu: Child | None = None
        self.resumed = False  # the guest has run: only then can it answer the power button
        self.status = "prelaunch"  # as query-status names it, kept by QMP's events
        self.stderr: list[str] = []
        self.started_at = 0.0
        self.exec_to_start = 0.0

    @property
    def process(self) -> Child:
        assert self.qemu is not None, "QEMU has not been started"
        return self.qemu

    async def spawn(
        self,
        reaper: Reaper,
        nursery: trio.Nursery,
        wiring: Wiring,
        inherit: list[int],
        join: services.Join | None,
        resume_early: bool,
    ) -> None:
        """QEMU, paused. `join` puts it in the container cgroup before it runs (so that its
        preallocated RAM is charged to the pod)."""
        iso = self.pre.isolation
        argv = qemu_argv(self.pre.spec, self.pre.accel, wiring, iso.plan.layout if iso else None)
        if resume_early:
            argv = [a for a in argv if a != "-S"]
        # An image disk's overlay goes where QEMU makes temporary files.
        env = {**os.environ, "TMPDIR": self.pre.scratch_dir}
        err_r, err_w = os.pipe()
        self.started_at = time.monotonic()
        self.exec_to_start = since_exec()
        try:
            if join is None:
                self.qemu = reaper.spawn("qemu", argv, pass_fds=inherit, stderr=err_w, env=env)
            else:
                self.qemu = await services.spawn_joined(
                    reaper, "qemu", argv, join, pass_fds=inherit, stderr=err_w, env=env
                )
        except (OSError, CgroupError) as e:
            os.close(err_r)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise StartupError(f"cannot start QEMU: {why}") from None
        finally:
            os.close(err_w)
        nursery.start_soon(self._forward_stderr, err_r)
        log.info("qemu-started", pid=self.qemu.pid, argv=argv)

    async def connect(self, ours: socket.socket, timeout: float, nursery: trio.Nursery) -> None:
        try:
            await self.qmp.connect(ours, timeout)
        except QMPError as e:
            raise StartupError(await self.failure(str(e))) from None
        nursery.start_soon(self._drain_events)

    async def execute(self, cmd: str) -> object:
        try:
            return await self.qmp.execute(cmd)
        except QMPError as e:
            raise StartupError(await self.failure(str(e))) from None

    async def failure(self, detail: str) -> str:
        """One line on why QEMU did not do what start-up asked."""
        qemu = self.process
        with trio.move_on_after(2):
            await qemu.wait()
        await trio.sleep(0.05)  # let the stderr forwarder catch QEMU's last words
        if qemu.running:
            return f"QEMU did not answer on QMP: {detail}"
        last = self.stderr[-1] if self.stderr else "no output"
        return f"QEMU exited during start-up with code {qemu.exit_code}: {last}"

    async def stop(self) -> int:
        """ACPI power-off, then `quit`, then SIGKILL; each only if the previous did not end
        it. Returns the runner's exit code for the way it ended."""
        qemu, qmp = self.qemu, self.qmp
        if qemu is None or not qemu.running:
            return EXIT_POWERED_OFF
        boots_os = self.pre.boots_os
        # A guest that never ran, or runs no OS, cannot answer the power button: go to quit.
        timeout = self.shutdown_timeout if self.resumed and boots_os else 0
        # Wait whatever QMP answered: a lost reply must not turn a clean exit into a SIGKILL.
        with trio.move_on_after(timeout):
            if timeout <= 0:
                await trio.sleep_forever()  # (cancelled at once by the zero deadline)
            log.info("qemu-stopping", how="system_powerdown", timeout=timeout)
            try:
                await qmp.execute("system_powerdown", timeout=min(2, timeout))
            except QMPError as e:
                log.warning("qmp-failed", command="system_powerdown", error=str(e))
            await qemu.wait()
        if not qemu.running:
            log.info("qemu-stopped", how="guest power-off")
            return EXIT_POWERED_OFF
        with trio.move_on_after(QUIT_GRACE):
            log.info("qemu-stopping", how="quit")
            try:
                await qmp.execute("quit", timeout=1)
            except QMPError as e:
                log.warning("qmp-failed", command="quit", error=str(e))
            await qemu.wait()
        if not qemu.running and not boots_os:
            # Firmware only: no OS to answer the power button, `quit` is its clean stop.
            log.info("qemu-stopped", how="quit", detail="firmware-only guest")
            return EXIT_POWERED_OFF
        if not qemu.running:
            log.warning(
                "qemu-stopped",
                how="quit",
                detail=f"the guest ignored the power button for {timeout:g} s",
            )
            return EXIT_QUIT
        log.warning("qemu-stopping", how="SIGKILL")
        qemu.send_signal(signal.SIGKILL)
        await qemu.wait()
        return EXIT_KILLED

    async def _forward_stderr(self, fd: int) -> None:
        def on_line(line: str) -> None:
            self.stderr = [*self.stderr[-9:], line]
            log.info("qemu-stderr", line=line)

        await forward_lines(fd, on_line)  # never raises: the reaper shares the nursery

    async def _drain_events(self) -> None:
        try:
            async for event in self.qmp.events:
                name = event.get("event")
                self.status = EVENT_STATES.get(str(name), self.status)
                log.info("qemu-event", name=name, data=event.get("data"))
        except Exception as e:  # the reaper shares this nursery: never take it down
            log.warning("qemu-events-lost", error=f"{type(e).__name__}: {e}")
