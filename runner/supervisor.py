"""The runner's life, read top to bottom: check, act step by step (each step pushing its
undo), wait, and unwind in reverse, shielded from cancellation.

Exit codes: 0 stopped on request; 1 start-up or teardown failed; QEMU's own code (128 +
signal if it was killed) when QEMU ended by itself; 128 + signal when a stop request arrived
before the instance was running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

import attrs
import trio

from runner import cpus, kube, plan, plumbing, rpc, spec
from runner.cgroups import CgroupError, CgroupFS, thread_cgroup
from runner.cpus import CpuSet
from runner.inotify import watch_kubelet_state
from runner.log import log
from runner.procs import Child, Reaper, become_subreaper
from runner.qemu import Wiring, dnsmasq_argv, qemu_argv, virtiofsd_argv
from runner.qmp import QMP, QMPError

STEPS = ("anchor", "cgroups", "float", "plumbing", "qemu", "qmp", "pin", "cont")
VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "virtiofsd")
# How the guest ended when we stopped it: the exit code says which step it took.
EXIT_POWERED_OFF, EXIT_QUIT, EXIT_KILLED = 0, 124, 137
KVM_GET_API_VERSION = 0xAE00
# After the guest's shutdown timeout: this long for QEMU to `quit`, then SIGKILL. Stopping takes
# at most shutdown-timeout + QUIT_GRACE + a second: keep the pod's grace period above that.
QUIT_GRACE = 3.0
# Embedded mode re-reads kubelet's state on every change, and at least this often.
KUBELET_RESYNC = 10.0


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
    isolation: Literal["on", "off"] = "on"  # off: no cgroups, no pinning (laptops, e2e tests)
    dnsmasq: str = "dnsmasq"
    virtiofsd: str | None = None  # None: the Rust daemon if installed, else QEMU's C one
    controller_socket: str | None = None  # None: embedded mode, the runner makes its cgroups
    controller_timeout: float = 30.0
    verify_interval: float = 1.0  # how often pinning is re-checked while the guest runs; 0: never
    pause_before: str | None = None  # fault-injection hook for tests: wait before this step
    resume_early: bool = False  # benchmark baseline: the guest runs before it is pinned
    inherited_fds: frozenset[int] = frozenset()  # open when the runner started (spec fds)


@attrs.define
class Prepared:
    """What preflight decided; the steps after it only act on this."""

    spec: spec.InstanceSpec
    accel: Literal["kvm", "tcg"]
    isolated: bool
    dnsmasq: str = ""
    virtiofsd: str = ""
    virtiofsd_flavour: Literal["c", "rust"] = "c"
    cg: CgroupFS | None = None
    own: str = ""
    pod: kube.PodCgroup | None = None
    plan: plan.Plan | None = None
    cgroups: EmbeddedCgroups | ControllerCgroups | None = None
    float_cg: str | None = None
    instance_cg: str | None = None


@attrs.define
class Plumbing:
    """What the plumbing step opened for QEMU."""

    nic_fds: list[int] = attrs.Factory(list)
    share_sockets: list[str] = attrs.Factory(list)
    console_theirs: socket.socket | None = None
    close_after_spawn: list[int] = attrs.Factory(list)
    qmp_ours: socket.socket | None = None


def check_guest_resources(the_spec: spec.InstanceSpec, inherited: frozenset[int]) -> None:
    """Files and fds the spec names must be there before anything starts. An fd must be one
    the runner inherited (numbers above 2 may be trio's own by now)."""
    for i, disk in enumerate(the_spec.disks):
        if disk.path is not None and not Path(disk.path).exists():
            raise StartupError(f"disk {i}: {disk.path} does not exist")
        if disk.fd is not None:
            if disk.fd not in inherited or not _fd_open(disk.fd):
                raise StartupError(f"disk {i}: fd {disk.fd} was not handed to the runner")
            # QEMU takes an fdset fd only with the access mode the drive asks for.
            mode = fcntl.fcntl(disk.fd, fcntl.F_GETFL) & os.O_ACCMODE
            if mode != (os.O_RDONLY if disk.read_only else os.O_RDWR):
                raise StartupError(
                    f"disk {i}: fd {disk.fd} must be open "
                    f"{'read-only' if disk.read_only else 'read-write'}"
                )
    for i, nic in enumerate(the_spec.nics):
        if nic.fd is not None and (
            nic.fd not in inherited
            or not _fd_open(nic.fd)
            or not stat.S_ISCHR(os.fstat(nic.fd).st_mode)
        ):
            raise StartupError(f"nic {i}: fd {nic.fd} is not a tap handed to the runner")
        if nic.mode == "tap" and Path(f"/sys/class/net/{the_spec.tap_name(i)}").exists():
            raise StartupError(f"nic {i}: network device {the_spec.tap_name(i)} already exists")
    for share in the_spec.shares:
        if not Path(share.source).is_dir():
            raise StartupError(f"share {share.tag}: {share.source} is not a directory")
    boot = the_spec.kernel_boot
    for path in (boot.kernel, boot.initrd) if boot else ():
        if path is not None and not Path(path).is_file():
            raise StartupError(f"boot: {path} does not exist")


def _stopper(child: Child) -> Callable[[], Awaitable[object]]:
    return lambda: child.stop(2)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


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


def cpu_ns(pid: int, tid: int) -> int:
    """Time one thread has spent on a CPU, in nanoseconds (schedstat, not tick-sampled)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def since_exec() -> float:
    """Seconds since this process was started (its exec, as /proc/self/stat counts it)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot_now - start_ticks / os.sysconf("SC_CLK_TCK")


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
        self.unidentifiable = False  # out of the pod's cgroup: the controller cannot know us

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
        if self.unidentifiable:
            log.warning(
                "deregister-skipped",
                reason="the container cgroup is gone, so the controller cannot tell our pod",
                detail="it removes the instance cgroup once the pod leaves cpu_manager_state",
            )
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
        self.qmp: QMP | None = None
        self._qemu_stderr: list[str] = []
        self.critical: list[Child] = []  # children whose death ends the instance (virtiofsd)
        self.console_tail: list[str] = []
        self._boots_os = False
        self._resumed = False  # the guest has run: only then can it answer the power button
        self._fds: set[int] = set()  # fds we own that QEMU also gets
        self._exec_to_qemu = 0.0
        self._pre: Prepared | None = None
        self.placed: list[dict[str, int]] = []
        self.repins = 0
        self.unpinned_ns: dict[int, int] = {}  # vCPU thread -> CPU time before it was pinned

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
        log.info("exit", code=code, orphans_reaped=self.reaper.orphans_reaped, repins=self.repins)
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
        """Until a stop request, QEMU's end, or the death of a child the guest depends on."""
        assert self.qemu is not None and self.qmp is not None
        qemu = self.qemu
        self.step = "running"
        broken: list[Child] = []
        with trio.CancelScope() as scope:
            self._interruptible = scope
            if self.stop_signal is None:
                async with trio.open_nursery() as watchers:

                    async def watch(child: Child) -> None:
                        await child.wait()
                        broken.append(child)
                        watchers.cancel_scope.cancel()

                    for child in [qemu, *self.critical]:
                        watchers.start_soon(watch, child)
                    watchers.start_soon(_monitor, "verify-pinning", self._keep_pinned, qemu)
                    watchers.start_soon(_monitor, "follow-kubelet", self._follow_kubelet)
        self._interruptible = None
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
                await self._stop_qemu(qemu, self.qmp)
            return 1
        if qemu.running:
            with trio.CancelScope(shield=True):  # a second signal must not cut this short
                return await self._stop_qemu(qemu, self.qmp)
        code = qemu.exit_code
        assert code is not None
        log.warning("qemu-exited", code=code, stderr=self._qemu_stderr[-3:])
        return 0 if self.stop_signal is not None and code == 0 else code

    # --- start-up, step by step --------------------------------------------------------------

    async def _start(self) -> None:
        """Start-up, read top to bottom: refuse what cannot work, then act step by step,
        each step pushing its undo before it can leave anything behind."""
        pre = await self._preflight()
        self._pre = pre
        if pre.isolated:
            await self._isolate(pre)
        await self._checkpoint("plumbing")
        wiring_parts = await self._plumb(pre)
        await self._checkpoint("qemu")
        qemu, qmp, started = await self._launch_qemu(pre, wiring_parts)
        await self._checkpoint("qmp")
        assert wiring_parts.qmp_ours is not None
        try:
            await qmp.connect(wiring_parts.qmp_ours, self.opts.qmp_timeout)
        except QMPError as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        assert self._nursery is not None
        self._nursery.start_soon(self._drain_events, qmp)
        qmp_ready = time.monotonic()
        await self._checkpoint("pin")
        placed = await self._pin(pre, qemu, qmp) if pre.isolated else []
        self.placed = placed
        pinned = time.monotonic()
        try:
            status = (await qmp.execute("query-status"))["status"]
            ticks = {p["tid"]: cpu_ticks(qemu.pid, p["tid"]) for p in placed}
        except (QMPError, OSError) as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        if status not in ("prelaunch", "paused") and not self.opts.resume_early:
            raise StartupError(f"the guest was {status!r} before its vCPUs were pinned")

        await self._checkpoint("cont")
        try:
            await qmp.execute("cont")
        except QMPError as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        self._resumed = True
        timings = {
            "qemu_start_to_qmp": round((qmp_ready - started) * 1000, 1),
            "qmp_to_pinned": round((pinned - qmp_ready) * 1000, 1),
            "qemu_start_to_pinned": round((pinned - started) * 1000, 1),
            "exec_to_qemu_start": round(self._exec_to_qemu * 1000, 1),
        }
        ready = {
            "name": pre.spec.name,
            "isolation": "on" if pre.isolated else "off",
            "pod_uid": pre.pod.pod_uid if pre.pod else None,
            "qemu_pid": qemu.pid,
            "instance_cgroup": pre.instance_cg,
            "float_cgroup": pre.float_cg,
            "float_cpus": cpus.format(pre.plan.float_cpus) if pre.plan else None,
            "vcpus": placed,
            "status_at_pin": status,
            "vcpu_ticks_before_cont": ticks,
            "vcpu_cpu_ns_before_pin": self.unpinned_ns,
            "nics": [
                {
                    "mac": pre.spec.mac(i),
                    "ip": n.ip,
                    "tap": pre.spec.tap_name(i) if n.mode == "tap" else None,
                }
                for i, n in enumerate(pre.spec.nics)
            ],
            "timings_ms": timings,
        }
        ready_file = Path(self.opts.run_dir) / "ready"
        write_atomic(ready_file, json.dumps(ready, indent=1))
        self.teardown.push("remove readiness file", _async(ready_file.unlink, missing_ok=True))
        log.info(
            "instance-pinned" if pre.isolated else "instance-running",
            vcpus=len(placed),
            ms=timings["qemu_start_to_pinned"],
            placement={p["vcpu"]: p["cpu"] for p in placed},
        )

    async def _preflight(self) -> Prepared:
        """Everything that can be refused is refused here, before anything runs."""
        o = self.opts
        self.step = "preflight"
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
        check_guest_resources(the_spec, o.inherited_fds)
        qemu_path = shutil.which(the_spec.qemu_binary)
        if qemu_path is None:
            raise StartupError(f"QEMU binary {the_spec.qemu_binary!r} not found")
        the_spec = attrs.evolve(the_spec, qemu_binary=qemu_path)
        accel: Literal["kvm", "tcg"] = (
            the_spec.accel if the_spec.accel != "auto" else ("kvm" if kvm_usable() else "tcg")
        )
        pre = Prepared(spec=the_spec, accel=accel, isolated=o.isolation == "on")
        self._boots_os = the_spec.kernel_boot is not None or bool(the_spec.disks)
        if any(n.mode == "tap" for n in the_spec.nics):
            pre.dnsmasq = shutil.which(o.dnsmasq) or ""
            if not pre.dnsmasq:
                raise StartupError(
                    f"dnsmasq binary {o.dnsmasq!r} not found (needed by the spec's tap nics)"
                )
        if the_spec.shares:
            pre.virtiofsd, pre.virtiofsd_flavour = await self._find_virtiofsd()
            longest = str(Path(o.run_dir) / f"virtiofs-{len(the_spec.shares)}.sock")
            if len(longest.encode()) > 107:
                raise StartupError(
                    f"--run-dir {o.run_dir} is too long for the virtiofs sockets "
                    "in it (Unix socket paths are at most 107 bytes)"
                )
        if not pre.isolated:
            log.warning(
                "isolation-off",
                detail="no cgroups, no pinning: vCPUs share every CPU "
                "with everything else (for trying the runner, not for production)",
            )
            log.info("plan", name=the_spec.name, accel=accel, isolation="off")
            return pre

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
        pre.cg, pre.own, pre.pod, pre.plan, pre.cgroups = cg, own, pod, the_plan, cgroups
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
        return pre

    async def _isolate(self, pre: Prepared) -> None:
        """Anchor in the container cgroup, float and instance cgroups, ourselves into float."""
        assert pre.cg is not None and pre.plan is not None and pre.cgroups is not None
        cg, cgroups, own = pre.cg, pre.cgroups, pre.own
        await self._checkpoint("anchor")
        await self._start_anchor(pre)

        await self._checkpoint("cgroups")
        self.teardown.push("release the instance cgroup", cgroups.release)
        try:
            pre.float_cg, pre.instance_cg = await cgroups.obtain(pre.plan)
        except CgroupError as e:
            raise StartupError(str(e)) from None
        log.info("cgroups-ready", float=pre.float_cg, instance=pre.instance_cg)

        await self._checkpoint("float")
        try:
            cg.move_process(pre.float_cg, os.getpid())
        except CgroupError as e:
            raise StartupError(str(e)) from None

        def move_back() -> None:
            try:
                cg.move_process(own, os.getpid())
            except CgroupError:
                if cg.dir(own).is_dir():
                    raise
                # Its scope went with its last process: the pod is going away anyway.
                log.warning("container-cgroup-gone", cgroup=own, detail="staying in float")
                if isinstance(cgroups, ControllerCgroups):
                    cgroups.unidentifiable = True

        self.teardown.push("move back to the container cgroup", _async(move_back))
        now_in = kube.own_cgroup_path(None, read_optional("/proc/self/cgroup"))
        if now_in != pre.float_cg:
            raise StartupError(f"moved to {pre.float_cg} but the kernel has us in {now_in}")
        # Everything we start from now on (dnsmasq, virtiofsd) runs on the shared CPUs.
        for task in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(task), pre.plan.float_cpus)
        log.info("moved-to-float", cgroup=pre.float_cg, cpus=cpus.format(pre.plan.float_cpus))

    async def _plumb(self, pre: Prepared) -> Plumbing:
        """Taps with dnsmasq, virtiofsd per share, the console: everything QEMU will use."""
        o, the_spec = self.opts, pre.spec
        assert self._nursery is not None
        run_dir = Path(o.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        out = Plumbing()
        keep: list[int] = []  # fds QEMU inherits; ours are closed once it has them
        for i, nic in enumerate(the_spec.nics):
            if nic.mode == "tap-fd":
                assert nic.fd is not None
                out.nic_fds.append(nic.fd)
                continue
            name = the_spec.tap_name(i)
            try:
                fd = plumbing.create_tap(name)
            except plumbing.PlumbingError as e:
                raise StartupError(str(e)) from None
            self._fds.add(fd)
            self.teardown.push(f"close tap {name}", _async(self._close_fd, fd))
            out.nic_fds.append(fd)
            keep.append(fd)
            try:
                await plumbing.run_command(
                    self.reaper,
                    self._nursery,
                    ["ip", "address", "add", f"{nic.gateway_address}/{nic.prefix}", "dev", name],
                )
                await plumbing.run_command(
                    self.reaper,
                    self._nursery,
                    ["ip", "link", "set", "dev", name, "mtu", str(nic.mtu), "up"],
                )
            except plumbing.PlumbingError as e:
                raise StartupError(str(e)) from None
            await self._start_dnsmasq(f"dnsmasq-{name}", dnsmasq_argv(the_spec, i, pre.dnsmasq))
            log.info(
                "tap-ready",
                tap=name,
                gateway=str(nic.gateway_address),
                ip=nic.ip,
                mac=the_spec.mac(i),
            )
        for i, share in enumerate(the_spec.shares):
            socket_path = str(run_dir / f"virtiofs-{i}.sock")
            Path(socket_path).unlink(missing_ok=True)
            argv = virtiofsd_argv(share, socket_path, pre.virtiofsd, pre.virtiofsd_flavour)
            name = f"virtiofsd-{share.tag}"
            try:
                child = await plumbing.start_virtiofsd(
                    self.reaper, self._nursery, name, argv, socket_path, timeout=10
                )
            except plumbing.PlumbingError as e:
                raise StartupError(str(e)) from None
            self.teardown.push(f"stop {name}", _stopper(child))
            self.teardown.push(
                f"remove {socket_path}", _async(Path(socket_path).unlink, missing_ok=True)
            )
            self.critical.append(child)
            out.share_sockets.append(socket_path)
            log.info("share-ready", tag=share.tag, source=share.source, read_only=share.read_only)
        if the_spec.console.stdout or the_spec.console.log_file:
            ours, theirs = socket.socketpair()
            out.console_theirs = theirs
            self._nursery.start_soon(self._forward_console, ours.detach(), the_spec)
        out.close_after_spawn = keep
        return out

    async def _launch_qemu(self, pre: Prepared, parts: Plumbing) -> tuple[Child, QMP, float]:
        """QEMU, paused. Isolated, it starts in the container cgroup so that its (preallocated)
        RAM is charged to the pod, and moves to float once QMP answers."""
        assert self._nursery is not None
        qmp = QMP(pre.spec.name)
        self.qmp = qmp
        self.teardown.push("close QMP", qmp.close)
        ours, theirs = socket.socketpair()
        parts.qmp_ours = ours
        wiring = Wiring(
            qmp_fd=theirs.fileno(),
            console_fd=parts.console_theirs.fileno() if parts.console_theirs else None,
            nic_fds=tuple(parts.nic_fds),
            share_sockets=tuple(parts.share_sockets),
        )
        argv = qemu_argv(pre.spec, pre.accel, wiring)
        if self.opts.resume_early:
            argv = [a for a in argv if a != "-S"]
        if pre.isolated:
            assert pre.cg is not None
            # The wrapper joins the container cgroup, then becomes QEMU (same pid).
            procs = str(pre.cg.dir(pre.own) / "cgroup.procs")
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]
        inherit = [wiring.qmp_fd, *wiring.nic_fds]
        inherit += [d.fd for d in pre.spec.disks if d.fd is not None]
        if wiring.console_fd is not None:
            inherit.append(wiring.console_fd)
        err_r, err_w = os.pipe()
        started = time.monotonic()
        self._exec_to_qemu = since_exec()
        try:
            qemu = self.reaper.spawn("qemu", argv, pass_fds=inherit, stderr=err_w)
        except OSError as e:
            os.close(err_r)
            ours.close()
            raise StartupError(f"cannot start QEMU: {e.strerror}") from None
        finally:
            theirs.close()
            os.close(err_w)
            if parts.console_theirs is not None:
                parts.console_theirs.close()
            for fd in parts.close_after_spawn:
                self._close_fd(fd)
        self.qemu = qemu
        self.teardown.push(
            "stop QEMU",
            lambda: self._stop_qemu(qemu, qmp),
            timeout=self.opts.shutdown_timeout + QUIT_GRACE + 5,
        )
        self._nursery.start_soon(self._forward_stderr, err_r)
        log.info("qemu-started", pid=qemu.pid, argv=argv)
        return qemu, qmp, started

    async def _pin(self, pre: Prepared, qemu: Child, qmp: QMP) -> list[dict[str, int]]:
        """QEMU into float (its RAM is allocated by now), then each vCPU thread into the
        instance cgroup and onto its CPU."""
        assert pre.cg is not None and pre.plan is not None and pre.instance_cg is not None
        cg, instance_cg = pre.cg, pre.instance_cg
        try:
            cg.move_process(pre.float_cg, qemu.pid)  # type: ignore[arg-type]
            found = await qmp.execute("query-cpus-fast")
        except (CgroupError, QMPError) as e:
            raise StartupError(await self._qemu_failure(qemu, str(e))) from None
        vcpus = sorted(found, key=lambda v: v["cpu-index"])
        if len(vcpus) != pre.spec.vcpus:
            raise StartupError(
                f"QEMU reports {len(vcpus)} vCPUs, the spec asks for {pre.spec.vcpus}"
            )
        placed = []
        for v, cpu in zip(vcpus, pre.plan.placement, strict=True):
            where = {"vcpu": v["cpu-index"], "tid": int(v["thread-id"]), "cpu": cpu}
            with contextlib.suppress(OSError):
                self.unpinned_ns[where["tid"]] = cpu_ns(qemu.pid, where["tid"])
            place_vcpu(cg, instance_cg, qemu.pid, where)
            placed.append(where)
        return placed

    async def _keep_pinned(self, qemu: Child) -> None:
        """Continuous verification while the guest runs: a vCPU moved to another cgroup or
        CPU behind our back (taskset, a stray cgroup write, the kernel resetting affinity when
        a cpuset is rewritten) is logged and put back."""
        pre, interval = self._pre, self.opts.verify_interval
        if pre is None or not self.placed or interval <= 0:
            return
        assert pre.cg is not None and pre.instance_cg is not None
        while True:
            await trio.sleep(interval)
            for where in self.placed:
                try:
                    in_cgroup = thread_cgroup(qemu.pid, where["tid"])
                    allowed = os.sched_getaffinity(where["tid"])
                except (CgroupError, OSError):
                    return  # QEMU is going away: its own watcher says so
                if in_cgroup == pre.instance_cg and allowed == {where["cpu"]}:
                    continue
                log.warning("vcpu-drifted", **where, cgroup=in_cgroup, cpus=cpus.format(allowed))
                try:
                    place_vcpu(pre.cg, pre.instance_cg, qemu.pid, where)
                except StartupError as e:
                    log.error("vcpu-repin-failed", **where, error=str(e))
                else:
                    self.repins += 1
                    log.warning("vcpu-repinned", **where)

    async def _follow_kubelet(self) -> None:
        """Embedded mode has no controller to keep float equal to kubelet's shared pool: a CPU
        kubelet gives to another Guaranteed pod must leave float, one it takes back returns."""
        pre = self._pre
        if pre is None or not isinstance(pre.cgroups, EmbeddedCgroups) or not self.placed:
            return
        wake = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                watch_kubelet_state, self.opts.kubelet_dir, lambda: wake.set(), KUBELET_RESYNC
            )
            while True:
                wake = trio.Event()
                try:  # at once first: kubelet may have moved during our start-up
                    self._resync_float(pre)
                except (CgroupError, OSError, ValueError) as e:
                    log.error("float-resync-failed", error=str(e))
                with trio.move_on_after(KUBELET_RESYNC):
                    await wake.wait()

    def _resync_float(self, pre: Prepared) -> None:
        assert pre.cg is not None and pre.plan is not None and pre.float_cg is not None
        assert isinstance(pre.cgroups, EmbeddedCgroups)
        text = read_optional(Path(self.opts.kubelet_dir) / "cpu_manager_state")
        try:
            state = kube.parse_cpu_manager_state(text) if text is not None else None
        except kube.KubeError as e:
            log.warning("kubelet-state-unreadable", error=str(e), detail="float kept as it is")
            return
        online = cpus.parse(Path("/sys/devices/system/cpu/online").read_text())
        own = frozenset(pre.plan.instance_cpus)
        others = pre.cgroups.other_instance_cpus(pre.instance_cg or "")
        want = plan.shared_cpus(state, online, own, others) - own
        have = pre.cg.cpus(pre.float_cg, effective=False)
        if want and want != have:
            pre.cg.set_cpus(pre.float_cg, want)
            pre.cg.spread_threads(pre.float_cg, want)
            log.info("float-cpus", old=cpus.format(have), new=cpus.format(want), reason="kubelet")

    async def _start_anchor(self, pre: Prepared) -> None:
        """systemd removes a scope with no process in it: something must stay behind, and
        must be put back if it dies."""
        assert self._nursery is not None and pre.cg is not None
        procs = str(pre.cg.dir(pre.own) / "cgroup.procs")
        current = [self.reaper.spawn("anchor", ["sleep", "infinity"])]
        scope, done = trio.CancelScope(), trio.Event()

        async def respawn() -> bool:
            """A new anchor, retried while fork fails; False once the container cgroup is
            gone. We are in float by now: the new anchor joins the container itself."""
            delay = 0.1
            while os.path.exists(procs):
                try:
                    current[0] = self.reaper.spawn(
                        "anchor", ["sh", "-c", 'echo $$ > "$0" && exec sleep infinity', procs]
                    )
                    return True
                except OSError as e:  # no fork now (a storm of processes)
                    log.error("anchor-restart-failed", error=e.strerror, retry=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)
            log.error(
                "container-cgroup-gone",
                cgroup=pre.own,
                detail="removed with its last process; the instance runs on",
            )
            return False

        async def keep(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            delay = 0.1
            try:
                with scope:
                    while True:
                        log.warning("anchor-died", code=await current[0].wait())
                        if not await respawn():
                            return
                        log.info("anchor-restarted", pid=current[0].pid)
                        await trio.sleep(delay)  # an anchor that keeps dying is not a busy loop
                        delay = min(delay * 2, 10.0)
            except Exception as e:  # the reaper shares this nursery: never take it down
                log.error("anchor-keeper-failed", error=f"{type(e).__name__}: {e}")
            finally:
                done.set()

        async def stop() -> None:
            scope.cancel()
            await done.wait()
            await current[0].stop(2)

        await self._nursery.start(keep)
        self.teardown.push("stop anchor", stop)

    async def _find_virtiofsd(self) -> tuple[str, Literal["c", "rust"]]:
        wanted = self.opts.virtiofsd
        candidates = [wanted] if wanted else list(VIRTIOFSD_PATHS)
        for candidate in candidates:
            path = shutil.which(candidate)
            if path:
                # The Rust daemon has --shared-dir; the C one (QEMU's) takes -o source=.
                try:
                    text = Path(path).read_bytes()
                except OSError:
                    text = b""
                return path, "rust" if b"shared-dir" in text else "c"
        raise StartupError(
            f"virtiofsd not found (looked for {', '.join(candidates)}); the spec's shares need it"
        )

    async def _start_dnsmasq(self, name: str, argv: list[str]) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        up, done = trio.Event(), trio.Event()
        failure: list[str] = []

        async def run(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            try:
                with scope:
                    await plumbing.supervise_dnsmasq(self.reaper, name, argv, on_up=up.set)
            except Exception as e:  # the reaper shares this nursery: never take it down
                failure.append(str(e))
                if up.is_set():
                    log.error("dnsmasq-failed", child=name, error=str(e))
            finally:
                done.set()

        async def stop() -> None:
            scope.cancel()
            await done.wait()

        await self._nursery.start(run)
        self.teardown.push(f"stop {name}", stop)
        while not (up.is_set() or done.is_set()):
            await trio.sleep(0.02)
        if not up.is_set():
            raise StartupError(failure[0] if failure else f"{name} did not start")

    def _close_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            _close_quietly(fd)

    async def _forward_console(self, fd: int, the_spec: spec.InstanceSpec) -> None:
        log_file = None
        if the_spec.console.log_file:
            try:
                log_file = open(the_spec.console.log_file, "a", buffering=1)  # noqa: SIM115
            except OSError as e:
                log.warning(
                    "console-log-unavailable", path=the_spec.console.log_file, error=e.strerror
                )

        def on_line(line: str) -> None:
            if the_spec.console.stdout:
                print(f"[{the_spec.name}] {line}", flush=True)
            if log_file is not None:
                log_file.write(line + "\n")
            self.console_tail[:] = [*self.console_tail[-49:], line]

        try:
            await plumbing.forward_lines(fd, on_line)
        finally:
            if log_file is not None:
                log_file.close()

    # --- helpers -----------------------------------------------------------------------------

    async def _stop_qemu(self, qemu: Child, qmp: QMP) -> int:
        """ACPI power-off, then `quit`, then SIGKILL; each only if the previous did not end it.
        Returns the runner's exit code for the way it ended."""
        if not qemu.running:
            return EXIT_POWERED_OFF
        # A guest that never ran, or runs no OS, cannot answer the power button: go to quit.
        timeout = self.opts.shutdown_timeout if self._resumed and self._boots_os else 0
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
        if qemu.running:
            with trio.move_on_after(QUIT_GRACE):
                log.info("qemu-stopping", how="quit")
                try:
                    await qmp.execute("quit", timeout=1)
                except QMPError as e:
                    log.warning("qmp-failed", command="quit", error=str(e))
                await qemu.wait()
            if not qemu.running and not self._boots_os:
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
        else:
            log.info("qemu-stopped", how="guest power-off")
            return EXIT_POWERED_OFF
        log.warning("qemu-stopping", how="SIGKILL")
        qemu.send_signal(signal.SIGKILL)
        await qemu.wait()
        return EXIT_KILLED

    async def _qemu_failure(self, qemu: Child, detail: str) -> str:
        with trio.move_on_after(2):
            await qemu.wait()
        await trio.sleep(0.05)  # let the stderr forwarder catch QEMU's last words
        if qemu.running:
            return f"QEMU did not answer on QMP: {detail}"
        last = self._qemu_stderr[-1] if self._qemu_stderr else "no output"
        return f"QEMU exited during start-up with code {qemu.exit_code}: {last}"

    async def _forward_stderr(self, fd: int) -> None:
        def on_line(line: str) -> None:
            self._qemu_stderr = [*self._qemu_stderr[-9:], line]
            log.info("qemu-stderr", line=line)

        await plumbing.forward_lines(fd, on_line)  # never raises: the reaper shares the nursery

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


async def _monitor(name: str, fn: Callable[..., Awaitable[None]], *args: object) -> None:
    """A watch kept beside the guest: its failure is logged, never the end of the instance."""
    try:
        await fn(*args)
    except Exception as e:
        log.error("monitor-failed", monitor=name, error=f"{type(e).__name__}: {e}")


def place_vcpu(cg: CgroupFS, instance_cg: str, qemu_pid: int, where: dict[str, int]) -> None:
    """One vCPU thread into the instance cgroup, onto its CPU, and read back."""
    vcpu, tid, cpu = where["vcpu"], where["tid"], where["cpu"]
    try:
        # Cgroup first, then affinity: on 6.1 a cpuset move resets the affinity.
        cg.move_thread(instance_cg, tid)
        os.sched_setaffinity(tid, {cpu})
        in_cgroup = thread_cgroup(qemu_pid, tid)
        allowed = os.sched_getaffinity(tid)
    except (CgroupError, OSError) as e:
        raise StartupError(f"cannot pin vCPU {vcpu} (thread {tid}) to CPU {cpu}: {e}") from None
    if in_cgroup != instance_cg or allowed != {cpu}:
        raise StartupError(
            f"vCPU {vcpu} (thread {tid}) did not stay pinned: "
            f"cgroup {in_cgroup}, CPUs {cpus.format(allowed)}"
        )


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
