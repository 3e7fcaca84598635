"""The runner's life, read top to bottom, like tini's main loop: handle signals, refuse what
cannot work, run the steps under one cancel scope, wait, and unwind in reverse, shielded.

Exit codes: 0 stopped on request; 1 start-up or teardown failed; QEMU's own code (128 +
signal if it was killed) when QEMU ended by itself; 128 + signal when a stop request arrived
before the instance was running; 70 a bug (everything is still unwound).
"""

from __future__ import annotations

import functools
import signal
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio

from runner import early
from runner.log import log
from runner.procs import Child, Reaper, become_subreaper
from runner.run.guest import Guest
from runner.run.options import Options, StartupError
from runner.run.preflight import preflight
from runner.run.steps import STEPS, Startup
from runner.run.teardown import Teardown, call


class Supervisor:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.reaper = Reaper()
        self.teardown = Teardown()
        self.step = "preflight"
        self.stop_signal: int | None = None
        self._interruptible: trio.CancelScope | None = None
        self.startup: Startup | None = None

    async def run(self) -> int:
        # Handlers first: as PID 1 we would otherwise ignore SIGTERM, and miss SIGCHLD.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD) as sigs:
            become_subreaper()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dispatch_signals, sigs)
                if (signum := early.stop_requested()) is not None:
                    self._stop(signum)  # it came while we were importing
                try:
                    return await self._lifecycle(nursery)
                finally:
                    nursery.cancel_scope.cancel()

    async def _lifecycle(self, nursery: trio.Nursery) -> int:
        code = 0
        try:
            with trio.CancelScope() as scope:
                self._interruptible = scope
                if self.stop_signal is not None:
                    scope.cancel()
                await self._start(nursery)
            self._interruptible = None
            if scope.cancelled_caught:
                assert self.stop_signal is not None
                log.warning(
                    "startup-interrupted",
                    step=self.step,
                    signal=signal.Signals(self.stop_signal).name,
                )
                code = 128 + self.stop_signal
            else:
                code = await self._wait()
        except StartupError as e:
            log.error("startup-failed", step=self.step, error=str(e))
            code = 1
        except Exception as e:  # a bug: still unwind everything
            log.error(
                "internal-error",
                step=self.step,
                error=f"{type(e).__name__}: {e}",
                traceback=traceback.format_exc().splitlines()[-6:],
            )
            code = 70
        finally:
            self._interruptible = None
            ok = await self.teardown.unwind()
        if not ok and code == 0:
            code = 1
        keeper = self.startup.keeper if self.startup else None
        log.info(
            "exit",
            code=code,
            orphans_reaped=self.reaper.orphans_reaped,
            repins=keeper.repins if keeper else 0,
            moved_to_float=keeper.moved_to_float if keeper else 0,
        )
        return code

    async def _start(self, nursery: trio.Nursery) -> None:
        await trio.lowlevel.checkpoint()  # a stop request that came first ends it here
        pre = preflight(self.opts)
        s = self.startup = Startup(
            self.opts, pre, self.reaper, nursery, Guest(pre, self.opts.shutdown_timeout)
        )
        for step in STEPS:
            if not step.wanted(s):
                continue
            await self._checkpoint(step.name, pre.run_dir)
            self.teardown.push(
                step.name, functools.partial(step.undo, s), step.undo_timeout(self.opts)
            )
            began = time.monotonic()
            await step.do(s)
            s.step_seconds[step.name] = round(time.monotonic() - began, 4)

    async def _wait(self) -> int:
        """Until a stop request, QEMU's end, or the death of a child the guest depends on."""
        s = self.startup
        assert s is not None
        guest, qemu = s.guest, s.guest.process
        self.step = s.phase = "running"
        broken: list[Child] = []
        with trio.CancelScope() as scope:
            self._interruptible = scope
            if self.stop_signal is None:
                async with trio.open_nursery() as watchers:

                    async def watch(child: Child) -> None:
                        await child.wait()
                        broken.append(child)
                        watchers.cancel_scope.cancel()

                    for child in [qemu, *s.critical]:
                        watchers.start_soon(watch, child)
                    if s.keeper is not None:
                        watchers.start_soon(
                            _monitor, s, "verify", s.keeper.keep, self.opts.verify_interval
                        )
                    if s.pre.isolation is not None:
                        watchers.start_soon(_monitor, s, "cgroups", s.pre.iso.source.maintain)
        self._interruptible = None
        s.phase = "stopping"
        s.vcpu_counters.read(s)  # the vCPUs' totals, while their threads still exist
        dead = [c for c in broken if c is not qemu]
        if dead and qemu.running:
            # virtiofsd also ends when its client goes: when the guest powers off, QEMU's
            # exit may simply not be reaped yet. Only a QEMU still running is a broken one.
            with trio.move_on_after(1):  # (nothing else can cancel us here)
                await qemu.wait()
        if dead and qemu.running:
            log.error(
                "instance-broken",
                child=dead[0].name,
                code=dead[0].exit_code,
                detail="a process the guest depends on died; stopping the instance",
            )
            with trio.CancelScope(shield=True):
                await guest.stop()
            return 1
        if qemu.running:
            with trio.CancelScope(shield=True):  # a second signal must not cut this short
                return await guest.stop()
        code = qemu.exit_code
        assert code is not None
        log.warning("qemu-exited", code=code, stderr=guest.stderr[-3:])
        return 0 if self.stop_signal is not None and code == 0 else code

    async def _dispatch_signals(self, sigs: AsyncIterator[int]) -> None:
        async for signum in sigs:
            if signum == signal.SIGCHLD:
                self.reaper.reap()
            else:
                self._stop(signum)

    def _stop(self, signum: int) -> None:
        if self.stop_signal is not None:
            log.info("stop-already-in-progress", signal=signal.Signals(signum).name)
            return
        self.stop_signal = signum
        if self.startup is not None:
            self.startup.phase = "stopping"  # /readyz says so at once
        log.info("stop-requested", signal=signal.Signals(signum).name, step=self.step)
        if self._interruptible is not None:
            self._interruptible.cancel()

    async def _checkpoint(self, step: str, run_dir: Path) -> None:
        self.step = step
        if self.startup is not None:
            self.startup.phase = step
        if self.opts.pause_before == step:
            marker = run_dir / "paused"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(step + "\n")
            self.teardown.push("remove pause marker", call(marker.unlink, missing_ok=True))
            log.warning("paused", step=step)
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()


async def _monitor(
    s: Startup, name: str, fn: Callable[..., Awaitable[None]], *args: object
) -> None:
    """A watch kept beside the guest: its failure is logged and fails /healthz, never the end
    of the instance."""
    try:
        await fn(*args)
    except Exception as e:
        s.monitor_errors[name] = f"{type(e).__name__}: {e}"
        log.error("monitor-failed", monitor=name, error=s.monitor_errors[name])
