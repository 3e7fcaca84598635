"""The runner's life, read top to bottom: check, act step by step (each step pushing its
undo), wait, and unwind in reverse, shielded from cancellation.

Exit codes: 0 stopped on request; 1 start-up or teardown failed; QEMU's own code (128 +
signal if it was killed) when QEMU ended by itself; 128 + signal when a stop request arrived
before the instance was running.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

import attrs
import trio

from runner import cpus, kube, plan, rpc, spec
from runner.cgroups import CgroupError, CgroupFS, thread_cgroup
from runner.cpus import CpuSet
from runner.log import log
from runner.procs import Child, Reaper, become_subreaper
from runner.qemu import Wiring, qemu_argv
from runner.qmp import QMP, QMPError

STEPS = ("anchor", "cgroups", "float", "qemu", "qmp", "pin", "cont")
KVM_GET_API_VERSION = 0xAE00
# After the guest's shutdown timeout: this long for QEMU to `quit`, then SIGKILL. Stopping takes
# at most shutdown-timeout + QUIT_GRACE + a second: keep the pod's grace period above that.
QUIT_GRACE = 3.0


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


@attrs.frozen(kw_only=True)
class Options:
    spec_path: str
    cgroup_mount: str = "/sys/fs/cgroup"
    cgroup_root: str = "/sys/fs/cgroup/instances"
    kubelet_dir: str = "/var/lib/kubelet"
    run_dir: str = "/run/instance-runner"
    shutdown_timeout: float = 20.0
    qmp_timeout: float = 30.0
    allow_spare_cpus: bool = False
    controller_socket: str | None = None  # None: embedded mode, the runner makes its cgroups
    controller_timeout: float = 30.0
    pause_before: str | None = None  # fault-injection hook for tests: wait before this step


class Teardown:
    """The undo stack: what start-up did, undone in reverse, each undo with its own deadline,
    all shielded so a second signal cannot skip cleanup."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], Awaitable[object]], float]] = []

    def push(self, name: str, undo: Callable[[], Awaitable[object]], timeout: float = 10) -> None:
        self._undo.append((name, undo, timeout))

    async def unwind(self) -> bool:
        ok = True
        with trio.CancelScope(shield=True):
            while self._undo:
                name, undo, timeout = self._undo.pop()
                try:
                    with trio.fail_after(timeout):
                        await undo()
                    log.debug("undone", step=name)
                except Exception as e:
                    ok = False
                    log.error("teardown-failed", step=name, error=str(e) or type(e).__name__)
        return ok


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def read_optional(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None


def cpu_ticks(pid: int, tid: int) -> int:
    """utime + stime of one thread, in clock ticks."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class EmbeddedCgroups:
    """float and instance cgroups created by the runner itself (no node controller). A
    controller client can take this role: same obtain/release shape."""

    def __init__(self, cg: CgroupFS, root: str) -> None:
        self.cg = cg
        self.root = root
        self.float = f"{root}/float"

    def instance(self, p: plan.Plan) -> str:
        return f"{self.root}/{p.instance_name}"

    _made: str | None = None

    def other_instance_cpus(self, own: str) -> CpuSet:
        if not self.cg.exists(self.root):
            return frozenset()
        found: set[int] = set()
        for child in self.cg.children(self.root):
            if child.rsplit("/", 1)[1].startswith("instance-") and child != own:
                found |= self.cg.cpus(child, effective=False)
        return frozenset(found)

    async def obtain(self, p: plan.Plan) -> tuple[str, str]:
        instance = self.instance(p)
        self.cg.make_domain_root(self.root)
        self.cg.make_threaded(self.float, p.float_cpus)
        if self.cg.exists(instance) and self.cg.threads(instance):
            raise StartupError(f"instance cgroup {instance} is already in use by another runner")
        self._made = instance  # ours from here on, even if the next writes fail
        self.cg.make_threaded(instance, frozenset(p.instance_cpus))
        return self.float, instance

    async def release(self) -> None:
        if self._made is not None:
            await self.cg.remove(self._made)


class ControllerCgroups:
    """float and instance cgroups from the node controller (registerCgroup/deregisterCgroup).
    The controller identifies us by our cgroup, so we must still be in the container cgroup
    at both calls: register before moving to float, deregister after moving back."""

    # Refusals that no retry will change.
    FINAL = (rpc.INVALID_PARAMS, rpc.FORBIDDEN, rpc.CONFLICT, rpc.METHOD_NOT_FOUND)

    def __init__(self, socket_path: str, timeout: float, uuid: str) -> None:
        self.socket = socket_path
        self.timeout = timeout
        self.uuid = uuid
        self.asked = False  # a registration may have happened, even if its answer was lost

    def other_instance_cpus(self, _own: str) -> CpuSet:
        return frozenset()  # the controller checks overlaps

    async def obtain(self, p: plan.Plan) -> tuple[str, str]:
        params = rpc.RegisterParams(self.uuid, cpus.format(p.instance_cpus))
        delay, attempt, last = 0.1, 0, ""
        with trio.move_on_after(self.timeout):
            while True:
                attempt += 1
                try:
                    res: rpc.RegisterResult = await rpc.call(
                        self.socket,
                        "registerCgroup",
                        params,
                        rpc.RegisterResult,
                        timeout=min(10, self.timeout),
                    )
                    self.asked = True
                    log.info("registered", controller=self.socket, attempts=attempt)
                    return res.float_path, res.cgroup_path
                except rpc.RPCError as e:
                    self.asked = True
                    if e.code in self.FINAL:
                        raise StartupError(
                            f"the controller refused registration: {e.message}"
                        ) from None
                    last = e.message
                except (OSError, trio.TooSlowError) as e:
                    # No connection: nothing was asked. Anything later: it may have been.
                    self.asked = self.asked or not isinstance(e, rpc.ConnectError)
                    last = str(e) or type(e).__name__
                log.info("controller-retry", attempt=attempt, error=last, delay=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise StartupError(
            f"no answer from the controller at {self.socket} within {self.timeout:g} s: {last}"
        )

    async def release(self) -> None:
        if not self.asked:
            return
        await rpc.call(
            self.socket,
            "deregisterCgroup",
            rpc.DeregisterParams(self.uuid),
            rpc.DeregisterResult,
            timeout=min(10, self.timeout),
        )


class Supervisor:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.reaper = Reaper()
        self.teardown = Teardown()
        self.step = "preflight"
        self.stop_signal: int | None = None
        self._interruptible: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.qemu: Child | None = None
        self._qemu_stderr: list[str] = []

    # --- the life ----------------------------------------------------------------------------

    async def run(self) -> int:
        # Handlers first: as PID 1 we would otherwise ignore SIGTERM, and miss SIGCHLD.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD) as sigs:
            become_subreaper()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._dispatch_signals, sigs)
                try:
                    return await self._lifecycle()
                finally:
                    nursery.cancel_scope.cancel()

    async def _lifecycle(self) -> int:
        code = 0
        try:
            with trio.CancelScope() as scope:
                self._interruptible = scope
                await self._start()
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
        log.info("exit", code=code, orphans_reaped=self.reaper.orphans_reaped)
        return code

    async def _dispatch_signals(self, sigs: AsyncIterator[int]) -> None:
        async for signum in sigs:
            if signum == signal.SIGCHLD:
                self.reaper.reap()
            elif self.stop_signal is None:
                self.stop_signal = signum
                log.info("stop-requested", signal=signal.Signals(signum).name, step=self.step)
                if self._interruptible is not None:
                    self._interruptible.cancel()
            else:
                log.info("stop-already-in-progress", signal=signal.Signals(signum).name)

    async def _checkpoint(self, step: str) -> None:
        self.step = step
        if self.opts.pause_before == step:
            marker = Path(self.opts.run_dir) / "paused"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(step + "\n")
            self.teardown.push("remove pause marker", _async(marker.unlink, missing_ok=True))
            log.warning("paused", step=step)
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def _wait(self) -> int:
        assert self.qemu is not None
        self.step = "running"
        with trio.CancelScope() as scope:
            self._interruptible = scope
            if self.stop_signal is None:
                await self.qemu.wait()
        self._interruptible = None
        if self.qemu.running:
            return 0  # stop requested: the QEMU undo shuts the guest down
        code = self.qemu.exit_code
        assert code is not None
        log.warning("qemu-exited", code=code, stderr=self._qemu_stderr[-3:])
        return 0 if self.stop_signal is not None and code == 0 else code

    # --- start-up, step by step --------------------------------------------------------------

    async def _start(self) -> None:
        o = self.opts
        # Everything that can be refused is refused before anything runs.
        if os.geteuid() != 0:
            raise StartupError(
                "instance-runner must run as root (a privileged container): it "
                "moves threads between cgroups and sets CPU affinity"
            )
        try:
            the_spec = spec.load(Path(o.spec_path).read_text(), source=o.spec_path)
        except OSError as e:
            raise StartupError(f"cannot read spec {o.spec_path}: {e.strerror}") from None
        except spec.SpecError as e:
            raise StartupError(str(e)) from None
        cg = CgroupFS(o.cgroup_mount)
        try:
            cg.check_v2_cpuset()
            root = cg.relative(o.cgroup_root)
        except CgroupError as e:
            raise StartupError(str(e)) from None
        except ValueError:
            raise StartupError(
                f"--cgroup-root {o.cgroup_root} is not below the cgroup mount {o.cgroup_mount}"
            ) from None
        try:
            # /proc/self follows the thread-group leader: read it now, before any move.
            own = kube.own_cgroup_path(
                read_optional("/proc/self/cpuset"), read_optional("/proc/self/cgroup")
            )
            pod = kube.parse_pod_cgroup(own)
            container_cpus = cg.cpus(own)
            state_text = read_optional(Path(o.kubelet_dir) / "cpu_manager_state")
            kubelet = kube.parse_cpu_manager_state(state_text) if state_text is not None else None
            online = cpus.parse(Path("/sys/devices/system/cpu/online").read_text())
            cgroups: EmbeddedCgroups | ControllerCgroups = (
                ControllerCgroups(o.controller_socket, o.controller_timeout, pod.pod_uid)
                if o.controller_socket
                else EmbeddedCgroups(cg, root)
            )
            the_plan = plan.make_plan(
                the_spec,
                pod,
                container_cpus,
                kubelet,
                online,
                cgroups.other_instance_cpus(f"{root}/instance-{pod.pod_uid}"),
                allow_spare_cpus=o.allow_spare_cpus,
            )
        except (kube.KubeError, plan.PlanError, CgroupError) as e:
            raise StartupError(str(e)) from None
        qemu_path = shutil.which(the_spec.qemu_binary)
        if qemu_path is None:
            raise StartupError(f"QEMU binary {the_spec.qemu_binary!r} not found")
        accel: Literal["kvm", "tcg"] = (
            the_spec.accel if the_spec.accel != "auto" else ("kvm" if kvm_usable() else "tcg")
        )
        log.info(
            "plan",
            name=the_spec.name,
            pod_uid=pod.pod_uid,
            container=own,
            driver=pod.driver,
            instance_cpus=cpus.format(the_plan.instance_cpus),
            float_cpus=cpus.format(the_plan.float_cpus),
            accel=accel,
            kubelet_state="read" if kubelet else "absent",
        )

        await self._checkpoint("anchor")
        # systemd removes a scope with no process in it: something must stay behind.
        anchor = self.reaper.spawn("anchor", ["sleep", "infinity"])
        self.teardown.push("stop anchor", lambda: anchor.stop(2))

        await self._checkpoint("cgroups")
        self.teardown.push("release the instance cgroup", cgroups.release)
        try:
            float_cg, instance_cg = await cgroups.obtain(the_plan)
        except CgroupError as e:
            raise StartupError(str(e)) from None
        log.info("cgroups-ready", float=float_cg, instance=instance_cg)

        await self._checkpoint("float")
        try:
            cg.move_process(float_cg, os.getpid())
        except CgroupError as e:
            raise StartupError(str(e)) from None
        self.teardown.push(
            "move back to the container cgroup", _async(cg.move_process, own, os.getpid())
        )
        now_in = kube.own_cgroup_path(None, read_optional("/proc/self/cgroup"))
        if now_in != float_cg:
            raise StartupError(f"moved to {float_cg} but the kernel has us in {now_in}")
        for task in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(task), the_plan.float_cpus)
        log.info("moved-to-float", cgroup=float_cg, cpus=cpus.format(the_plan.float_cpus))

        await self._checkpoint("qemu")
        qmp = QMP(the_spec.name)
        self.teardown.push("close QMP", qmp.close)
        ours, theirs = socket.socketpair()
        err_r, err_w = os.pipe()
        argv = qemu_argv(
            attrs.evolve(the_spec, qemu_binary=qemu_path), accel, Wiring(qmp_fd=theirs.fileno())
        )
        started = time.monotonic()
        try:
            qemu = self.reaper.spawn("qemu", argv, pass_fds=[theirs.fileno()], stderr=err_w)
        except OSError as e:
            raise StartupError(f"cannot start QEMU: {e.strerror}") from None
        finally:
            theirs.close()
            os.close(err_w)
        self.qemu = qemu
        self.teardown.push(
            "stop QEMU",
            lambda: self._stop_qemu(qemu, qmp),
            timeout=o.shutdown_timeout + QUIT_GRACE + 5,
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._forward_stderr, err_r)
        log.info("qemu-started", pid=qemu.pid, argv=argv)

        await self._checkpoint("qmp")
        try:
            await qmp.connect(ours, o.qmp_timeout)
        except QMPError as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        self._nursery.start_soon(self._drain_events, qmp)
        qmp_ready = time.monotonic()

        await self._checkpoint("pin")
        try:
            found = await qmp.execute("query-cpus-fast")
        except QMPError as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        vcpus = sorted(found, key=lambda v: v["cpu-index"])
        if len(vcpus) != the_spec.vcpus:
            raise StartupError(
                f"QEMU reports {len(vcpus)} vCPUs, the spec asks for {the_spec.vcpus}"
            )
        placed = []
        for v, cpu in zip(vcpus, the_plan.placement, strict=True):
            tid = int(v["thread-id"])
            try:
                # Cgroup first, then affinity: on 6.1 a cpuset move resets the affinity.
                cg.move_thread(instance_cg, tid)
                os.sched_setaffinity(tid, {cpu})
                in_cgroup = thread_cgroup(qemu.pid, tid)
                allowed = os.sched_getaffinity(tid)
            except (CgroupError, OSError) as e:
                raise StartupError(
                    f"cannot pin vCPU {v['cpu-index']} (thread {tid}) to CPU {cpu}: {e}"
                ) from None
            if in_cgroup != instance_cg or allowed != {cpu}:
                raise StartupError(
                    f"vCPU {v['cpu-index']} (thread {tid}) did not stay pinned: "
                    f"cgroup {in_cgroup}, CPUs {cpus.format(allowed)}"
                )
            placed.append({"vcpu": v["cpu-index"], "tid": tid, "cpu": cpu})
        pinned = time.monotonic()
        try:
            status = (await qmp.execute("query-status"))["status"]
            ticks = {p["tid"]: cpu_ticks(qemu.pid, p["tid"]) for p in placed}
        except (QMPError, OSError) as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        if status not in ("prelaunch", "paused"):
            raise StartupError(f"the guest was {status!r} before its vCPUs were pinned")

        await self._checkpoint("cont")
        try:
            await qmp.execute("cont")
        except QMPError as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        ready = {
            "name": the_spec.name,
            "pod_uid": pod.pod_uid,
            "qemu_pid": qemu.pid,
            "instance_cgroup": instance_cg,
            "float_cgroup": float_cg,
            "float_cpus": cpus.format(the_plan.float_cpus),
            "vcpus": placed,
            "status_at_pin": status,
            "vcpu_ticks_before_cont": ticks,
            "timings_ms": {
                "qemu_start_to_qmp": round((qmp_ready - started) * 1000, 1),
                "qmp_to_pinned": round((pinned - qmp_ready) * 1000, 1),
                "qemu_start_to_pinned": round((pinned - started) * 1000, 1),
            },
        }
        ready_file = Path(o.run_dir) / "ready"
        write_atomic(ready_file, json.dumps(ready, indent=1))
        self.teardown.push("remove readiness file", _async(ready_file.unlink, missing_ok=True))
        log.info(
            "instance-pinned",
            vcpus=len(placed),
            ms=round((pinned - started) * 1000, 1),
            placement={p["vcpu"]: p["cpu"] for p in placed},
        )

    # --- helpers -----------------------------------------------------------------------------

    async def _stop_qemu(self, qemu: Child, qmp: QMP) -> None:
        """ACPI power-off, then `quit`, then SIGKILL; each only if the previous did not end it."""
        if not qemu.running:
            return
        timeout = self.opts.shutdown_timeout
        # Wait whatever QMP answered: a lost reply must not turn a clean exit into a SIGKILL.
        with trio.move_on_after(timeout):
            log.info("qemu-stopping", how="system_powerdown", timeout=timeout)
            try:
                await qmp.execute("system_powerdown", timeout=min(2, timeout))
            except QMPError as e:
                log.warning("qmp-failed", command="system_powerdown", error=str(e))
            await qemu.wait()
        if qemu.running:
            with trio.move_on_after(QUIT_GRACE):
                log.info("qemu-stopping", how="quit")
                try:
                    await qmp.execute("quit", timeout=1)
                except QMPError as e:
                    log.warning("qmp-failed", command="quit", error=str(e))
                await qemu.wait()
        if qemu.running:
            log.warning("qemu-stopping", how="SIGKILL")
            qemu.send_signal(signal.SIGKILL)
            await qemu.wait()

    async def _qemu_failure(self, qemu: Child, detail: str) -> str:
        with trio.move_on_after(2):
            await qemu.wait()
        await trio.sleep(0.05)  # let the stderr forwarder catch QEMU's last words
        if qemu.running:
            return f"QEMU did not answer on QMP: {detail}"
        last = self._qemu_stderr[-1] if self._qemu_stderr else "no output"
        return f"QEMU exited during start-up with code {qemu.exit_code}: {last}"

    async def _forward_stderr(self, fd: int) -> None:
        try:
            await self._forward_stderr_lines(fd)
        except Exception as e:  # the reaper shares this nursery: never take it down
            log.warning("qemu-stderr-lost", error=f"{type(e).__name__}: {e}")

    async def _forward_stderr_lines(self, fd: int) -> None:
        stream = trio.lowlevel.FdStream(fd)
        buf = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip()
                    self._qemu_stderr = [*self._qemu_stderr[-9:], line]
                    log.info("qemu-stderr", line=line)

    async def _drain_events(self, qmp: QMP) -> None:
        try:
            async for event in qmp.events:
                log.info("qemu-event", name=event.get("event"), data=event.get("data"))
        except Exception as e:  # the reaper shares this nursery: never take it down
            log.warning("qemu-events-lost", error=f"{type(e).__name__}: {e}")


def _async(fn: Callable[..., object], *args: object, **kw: object) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        fn(*args, **kw)

    return call


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
