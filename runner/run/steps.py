"""Start-up as data: the ordered steps, each a (name, do, undo). The supervisor pushes a
step's undo before it runs the step, so an undo must cope with a step that stopped half-way;
teardown runs the undos in reverse. The same list names the `--pause-before` checkpoints and
the README's account of start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from runner import cpus, httpd, kube, netplan, netrules, plan, plumbing, podnet
from runner.argv import Wiring, dnsmasq_argv, passt_argv, virtiofsd_argv
from runner.log import log
from runner.node import procfs
from runner.node.cgroupfs import CgroupError
from runner.node.pinning import Keeper, PinError, check_placed
from runner.plan import Placed
from runner.procs import Child, Reaper
from runner.run import netmaker, services
from runner.run.cgroupsource import Cgroups
from runner.run.guest import QUIT_GRACE, Guest, since_exec
from runner.run.observer import VcpuCounters, log_vcpu_totals, routes
from runner.run.options import Options, StartupError
from runner.run.preflight import Prepared
from runner.run.readiness import ready_doc, write_ready
from runner.run.services import Service


@attrs.define
class Startup:
    """What the steps share: what preflight decided, and what each step made."""

    opts: Options
    pre: Prepared
    reaper: Reaper
    nursery: trio.Nursery
    guest: Guest
    run_dir_made: bool = False
    lock_fd: int = -1
    anchor: list[Child] = attrs.Factory(list)  # the current anchor, kept by its service
    cgroups: Cgroups | None = None
    services: list[services.Service] = attrs.Factory(list)  # in start order
    critical: list[Child] = attrs.Factory(list)  # the guest dies with these (virtiofsd)
    tap_fds: list[int] = attrs.Factory(list)  # ours; QEMU gets copies
    network: netplan.NetworkPlan | None = None  # made in the pod's namespace
    network_before: dict[str, str] = attrs.Factory(dict)  # its sysctls as they were
    wiring: Wiring | None = None
    qmp_ours: socket.socket | None = None
    placed: list[Placed] = attrs.Factory(list)
    vcpu_tids: dict[int, int] = attrs.Factory(dict)  # vCPU index -> thread, pinned or not
    unpinned_ns: dict[int, int] = attrs.Factory(dict)  # vCPU thread -> CPU time before pin
    keeper: Keeper | None = None
    qmp_ready: float = 0.0
    pinned: float = 0.0
    step_seconds: dict[str, float] = attrs.Factory(dict)  # how long each step's do took
    running_after: float | None = None  # seconds from the runner's exec to the guest running
    http: Service | None = None
    vcpu_counters: VcpuCounters = attrs.Factory(VcpuCounters)
    phase: str = "preflight"  # the step under way, "running", then "stopping"
    monitor_errors: dict[str, str] = attrs.Factory(dict)  # monitors of the guest that died


Action = Callable[[Startup], Awaitable[None]]


def always(_s: Startup) -> bool:
    return True


def isolated(s: Startup) -> bool:
    return s.pre.isolation is not None


@attrs.frozen
class Step:
    name: str
    do: Action
    undo: Action
    wanted: Callable[[Startup], bool] = always  # skipped when False (e.g. --isolation off)
    undo_timeout: Callable[[Options], float] = lambda _o: 10.0


async def nothing(_s: Startup) -> None:
    pass


# --- http: /metrics, /healthz and /readyz, up first so that probes see start-up too ----------


async def serve_http(s: Startup) -> None:
    address = s.opts.metrics_address
    assert address is not None
    try:
        s.http, _ = await services.launch(
            s.nursery, "http", lambda status: httpd.serve(address, routes(s), task_status=status)
        )
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {address}: {e.strerror or e}") from None


async def stop_http(s: Startup) -> None:
    if s.http is not None:
        await s.http.stop()


# --- run-dir: a directory of our own, locked ---------------------------------------------------


async def claim_run_dir(s: Startup) -> None:
    run_dir = s.pre.run_dir
    s.run_dir_made = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StartupError(f"cannot use run dir {run_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # the lock file is the other runner's: leave it
        raise StartupError(f"run dir {run_dir} is in use by another runner") from None
    except OSError as e:
        os.close(fd)
        raise StartupError(f"cannot lock run dir {run_dir}: {e.strerror}") from None
    s.lock_fd = fd


async def release_run_dir(s: Startup) -> None:
    if s.lock_fd < 0:
        return
    (s.pre.run_dir / "lock").unlink(missing_ok=True)
    os.close(s.lock_fd)
    s.lock_fd = -1
    if s.run_dir_made:
        with contextlib.suppress(OSError):  # not empty: someone else's files, keep them
            s.pre.run_dir.rmdir()


# --- anchor: something must stay in the container cgroup ----------------------------------------


async def start_anchor(s: Startup) -> None:
    join = s.pre.iso.source.join_container
    service, current = await services.launch(
        s.nursery, "anchor", lambda status: services.anchor(s.reaper, join, status)
    )
    s.anchor = current
    s.services.append(service)


async def stop_anchor(s: Startup) -> None:
    await _stop_services(s, "anchor")


# --- cgroups: float and the instance cgroup -----------------------------------------------------


async def obtain_cgroups(s: Startup) -> None:
    s.cgroups = await s.pre.iso.source.obtain(s.pre.iso.plan)
    log.info("cgroups-ready", float=s.cgroups.float, instance=s.cgroups.instance)


async def release_cgroups(s: Startup) -> None:
    await s.pre.iso.source.release()


# --- float: the runner, and everything it starts from now on, on the shared CPUs ---------------


async def move_to_float(s: Startup) -> None:
    assert s.cgroups is not None
    float_cg = s.cgroups.float
    try:
        await s.pre.iso.source.enter_float(os.getpid())
    except CgroupError as e:
        raise StartupError(str(e)) from None
    now_in = kube.own_cgroup_path(None, procfs.read("/proc/self/cgroup"))
    if now_in != float_cg:
        raise StartupError(f"moved to {float_cg} but the kernel has us in {now_in}")
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), s.cgroups.float_cpus)
    log.info("moved-to-float", cgroup=float_cg, cpus=cpus.format(s.cgroups.float_cpus))


async def move_back(s: Startup) -> None:
    iso = s.pre.iso
    try:
        await iso.source.leave_float(os.getpid())
    except CgroupError:
        if iso.cg.dir(iso.container).is_dir():
            raise
        # Its scope went with its last process: the pod is going away anyway.
        log.warning("container-cgroup-gone", cgroup=iso.container, detail="staying in float")


# --- plumbing: taps with dnsmasq, virtiofsd per share, the console -----------------------------


async def plumb(s: Startup) -> None:
    the_spec = s.pre.spec
    nic_fds: list[int] = []
    streams: set[int] = set()
    for i, nic in enumerate(the_spec.nics):
        if nic.mode == "tap-fd":
            assert nic.fd is not None
            nic_fds.append(nic.fd)
            continue
        if nic.binding == "passt":
            nic_fds.append(await _start_passt(s, i))
            streams.add(i)
            continue
        name = the_spec.tap_name(i)
        try:
            fd = podnet.attach_tap(name)
            s.tap_fds.append(fd)
            nic_fds.append(fd)
            argv = dnsmasq_argv(the_spec, i, s.pre.dnsmasq)
            label = f"dnsmasq-{name}"
            await _launch(s, label, functools.partial(services.dnsmasq, s.reaper, label, argv))
        except plumbing.PlumbingError as e:
            raise StartupError(str(e)) from None
        log.info(
            "tap-ready", tap=name, gateway=str(nic.gateway_address), ip=nic.ip, mac=the_spec.mac(i)
        )
    sockets: list[str] = []
    for i, share in enumerate(the_spec.shares):
        path = str(s.pre.run_dir / f"virtiofs-{i}.sock")
        argv = virtiofsd_argv(
            share,
            path,
            s.pre.shares.binary,
            s.pre.shares.flavour,
            s.pre.shares.sandbox,
            share.source in s.pre.shares.as_mounted,
        )
        name = f"virtiofsd-{share.tag}"
        try:
            child = await _launch(
                s, name, functools.partial(services.socket_daemon, s.reaper, name, argv, path)
            )
        except plumbing.PlumbingError as e:
            raise StartupError(str(e)) from None
        assert isinstance(child, Child)
        s.critical.append(child)
        sockets.append(path)
        log.info("share-ready", tag=share.tag, source=share.source, read_only=share.read_only)
    console_fd = None
    if the_spec.console.stdout or the_spec.console.log_file:
        ours, theirs = socket.socketpair()
        console_fd = theirs.detach()
        s.tap_fds.append(console_fd)  # closed with ours once QEMU has it
        fd = ours.detach()
        await _launch(s, "console", functools.partial(services.console, fd, the_spec))
    qmp_ours, qmp_theirs = socket.socketpair()
    s.qmp_ours = qmp_ours
    qmp_fd = qmp_theirs.detach()
    s.tap_fds.append(qmp_fd)
    seed = s.pre.run_dir / SEED
    s.wiring = Wiring(
        seed=str(seed) if s.pre.seed is not None else None,
        uefi=(s.pre.uefi[0], str(_efi_vars(s))) if s.pre.uefi is not None else None,
        qmp_fd=qmp_fd,
        console_fd=console_fd,
        nic_fds=tuple(nic_fds),
        streams=frozenset(streams),
        share_sockets=tuple(sockets),
    )


async def _start_passt(s: Startup, index: int) -> int:
    """The nic's passt on a socketpair with QEMU (no socket file: passt drops to nobody before
    it binds one). Critical like virtiofsd: QEMU 7.2 cannot reconnect a stream netdev."""
    ours, theirs = socket.socketpair()
    fd, qemu_fd = ours.detach(), theirs.detach()
    s.tap_fds += [fd, qemu_fd]  # passt and QEMU have their copies once started
    argv = passt_argv(s.pre.spec, index, fd, s.pre.passt, _reserved(s.opts))
    name = f"passt-{index}"
    try:
        child = await _launch(s, name, functools.partial(services.passt, s.reaper, name, argv, fd))
    except plumbing.PlumbingError as e:
        raise StartupError(str(e)) from None
    assert isinstance(child, Child)
    s.critical.append(child)
    s.tap_fds.remove(fd)  # passt has it now
    os.close(fd)
    ports = ",".join(f"{p.port}/{p.protocol}" for p in s.pre.spec.nics[index].ports) or "all"
    log.info("passt-ready", nic=index, pid=child.pid, ports=ports)
    return qemu_fd


async def unplumb(s: Startup) -> None:
    await _stop_services(s, "dnsmasq-", "passt-", "virtiofsd-", "console")
    close_fds(s)


def close_fds(s: Startup) -> None:
    while s.tap_fds:
        with contextlib.suppress(OSError):
            os.close(s.tap_fds.pop())


# --- disks: a volume's disk.img made when it is missing ------------------------------------------


async def make_disks(s: Startup) -> None:
    """Sparse, at the size asked: it stays, as the volume's disk (nothing to undo)."""
    for i, disk in enumerate(s.pre.spec.disks):
        if disk.size_gib is None or disk.path is None or os.path.exists(disk.path):
            continue
        try:
            fd = os.open(disk.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, disk.size_gib << 30)
            finally:
                os.close(fd)
        except OSError as e:
            raise StartupError(f"disk {i}: cannot make {disk.path}: {e.strerror}") from None
        log.info("disk-made", disk=i, path=disk.path, size_gib=disk.size_gib)


# --- firmware: UEFI's variable store ------------------------------------------------------------


def _efi_vars(s: Startup) -> Path:
    boot = s.pre.spec.boot
    given = boot.efi_vars if boot is not None else None
    return Path(given) if given is not None else s.pre.run_dir / "efi-vars.fd"


async def copy_efi_vars(s: Startup) -> None:
    """From OVMF's template: per start in the run directory, or once into `efi_vars` (a
    volume's file that keeps the boot entries the guest writes)."""
    assert s.pre.uefi is not None
    store = _efi_vars(s)
    if store.exists():
        return
    try:
        shutil.copyfile(s.pre.uefi[1], store)
    except OSError as e:
        raise StartupError(f"cannot make UEFI's variable store {store}: {e.strerror}") from None
    log.info("efi-vars-made", path=str(store))


async def remove_efi_vars(s: Startup) -> None:
    boot = s.pre.spec.boot
    if boot is None or boot.efi_vars is None:  # ours, per start
        _efi_vars(s).unlink(missing_ok=True)


# --- seed: cloud-init's NoCloud ISO -------------------------------------------------------------

SEED = "seed.iso"


async def write_seed(s: Startup) -> None:
    assert s.pre.seed is not None
    path = s.pre.run_dir / SEED
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
        with os.fdopen(fd, "wb") as f:
            f.write(s.pre.seed)
    except OSError as e:
        raise StartupError(f"cannot write the cloud-init seed {path}: {e.strerror}") from None
    log.info("seed-ready", path=str(path), bytes=len(s.pre.seed))


async def remove_seed(s: Startup) -> None:
    (s.pre.run_dir / SEED).unlink(missing_ok=True)


# --- network: taps, forwarding, NAT and limits in the pod's namespace ---------------------------


def _reserved(o: Options) -> tuple[netrules.Port, ...]:
    """The runner's own ports: never forwarded to the guest."""
    if o.metrics_address is None:
        return ()
    return (netrules.Port(port=httpd.parse_address(o.metrics_address)[1]),)


def _maker(s: Startup) -> netmaker.NetworkMaker:
    if s.opts.controller_socket and s.pre.isolation is not None:
        return netmaker.ViaController(
            s.opts.controller_socket, s.opts.controller_timeout, s.pre.iso.pod.pod_uid
        )
    return netmaker.Local(s.reaper, s.nursery, s.pre.nft or "nft", s.pre.run_dir)


async def make_network(s: Startup) -> None:
    the_plan = netplan.plan(s.pre.spec, _reserved(s.opts))
    s.network = the_plan
    s.network_before = await _maker(s).make(the_plan)
    for tap in the_plan.taps:
        log.info(
            "tap-made",
            tap=tap.name,
            gateway=tap.gateway4,
            gateway6=tap.gateway6,
            mtu=tap.mtu,
            ingress_mbit=tap.ingress_mbit,
        )
    for lim in the_plan.egress:
        log.info("egress-limited", tap=lim.tap, mbit=lim.mbit, burst_kb=lim.burst_kb)
    if (m := the_plan.masquerade) is not None:
        ports = ",".join(f"{p.port}/{p.protocol}" for p in m.ports) or "all"
        log.info(
            "masquerade-ready", tap=m.tap, guest=str(m.guest4), guest6=str(m.guest6), ports=ports
        )


async def unmake_network(s: Startup) -> None:
    if s.network is None:
        return
    await _maker(s).unmake(s.network, s.network_before)
    s.network = None


# --- qemu: started paused ------------------------------------------------------------------------


async def start_qemu(s: Startup) -> None:
    w = s.wiring
    assert w is not None
    inherit = [w.qmp_fd, *w.nic_fds, *(d.fd for d in s.pre.spec.disks if d.fd is not None)]
    if w.console_fd is not None:
        inherit.append(w.console_fd)
    # Isolated, QEMU starts in the container cgroup so that its (preallocated) RAM is charged
    # to the pod; it moves to float once QMP answers.
    join = s.pre.iso.source.join_container if s.pre.isolation else None
    try:
        await s.guest.spawn(s.reaper, s.nursery, w, inherit, join, s.opts.resume_early)
    finally:
        close_fds(s)  # QEMU has its copies (or never will)


async def stop_qemu(s: Startup) -> None:
    try:
        await s.guest.stop()
    finally:
        await s.guest.qmp.close()


def qemu_stop_timeout(o: Options) -> float:
    return o.shutdown_timeout + QUIT_GRACE + 5


# --- qmp: QEMU answers --------------------------------------------------------------------------


async def connect_qmp(s: Startup) -> None:
    assert s.qmp_ours is not None
    await s.guest.connect(s.qmp_ours, s.opts.qmp_timeout, s.nursery)
    s.qmp_ready = time.monotonic()


# --- pin: QEMU to float, each vCPU thread to the instance cgroup and its CPU -------------------


async def pin(s: Startup) -> None:
    iso, guest = s.pre.iso, s.guest
    assert s.cgroups is not None
    qemu = guest.process
    found = await guest.execute("query-cpus-fast")
    try:
        placed = plan.match_vcpus(
            found,  # type: ignore[arg-type]
            iso.plan.placement,
            s.pre.spec.realtime_priorities(),
        )
    except plan.PlanError as e:
        raise StartupError(str(e)) from None
    for p in placed:
        with contextlib.suppress(OSError):
            s.unpinned_ns[p.tid] = procfs.schedstat(qemu.pid, p.tid).run_ns
    anchor = s.anchor[0].pid if s.anchor else -1
    try:
        # QEMU to float (its RAM is allocated by now), then each vCPU to its CPU.
        await iso.source.place(qemu.pid, placed, anchor)
        for p in placed:  # read back here too, whoever made the writes
            check_placed(s.cgroups.instance, qemu.pid, p)
    except (CgroupError, PinError) as e:
        raise StartupError(str(e)) from None
    s.placed = placed
    s.vcpu_tids = {p.vcpu: p.tid for p in placed}
    if not iso.source.keeps:
        return  # the controller keeps them
    s.keeper = Keeper(
        iso.cg,
        iso.container,
        s.cgroups.instance,
        s.cgroups.float,
        qemu.pid,
        placed,
        lambda: s.anchor[0].pid if s.anchor else -1,
    )


# --- cont: the guest runs, the readiness file says so -------------------------------------------


async def resume(s: Startup) -> None:
    guest, qemu = s.guest, s.guest.process
    s.pinned = time.monotonic()
    status = str((await guest.execute("query-status"))["status"])  # type: ignore[index]
    try:
        ticks = {p.tid: procfs.stat(qemu.pid, p.tid).ticks for p in s.placed}
    except OSError as e:
        raise StartupError(await guest.failure(str(e))) from None
    if status not in ("prelaunch", "paused") and not s.opts.resume_early:
        raise StartupError(f"the guest was {status!r} before its vCPUs were pinned")
    if not s.vcpu_tids:  # not pinned (isolation off): still watched
        s.vcpu_tids = plan.vcpu_threads(await guest.execute("query-cpus-fast"))  # type: ignore[arg-type]
    guest.status = status
    s.vcpu_counters.read(s)  # a first reading: the totals at exit start from it
    await guest.execute("cont")
    guest.resumed = True
    guest.status = "running"
    s.running_after = round(since_exec(), 3)
    started = guest.started_at
    timings = {
        "qemu_start_to_qmp": round((s.qmp_ready - started) * 1000, 1),
        "qmp_to_pinned": round((s.pinned - s.qmp_ready) * 1000, 1),
        "qemu_start_to_pinned": round((s.pinned - started) * 1000, 1),
        "exec_to_qemu_start": round(guest.exec_to_start * 1000, 1),
    }
    doc = ready_doc(s.pre, qemu.pid, s.cgroups, s.placed, status, ticks, s.unpinned_ns, timings)
    write_ready(s.pre.run_dir / "ready", doc)
    log.info(
        "instance-pinned" if s.pre.isolation else "instance-running",
        vcpus=len(s.placed),
        ms=timings["qemu_start_to_pinned"],
        placement={p.vcpu: p.cpu for p in s.placed},
        **(
            {"fifo": {p.vcpu: p.priority for p in s.placed if p.priority}}
            if s.pre.spec.realtime
            else {}
        ),
    )


async def stop_running(s: Startup) -> None:
    (s.pre.run_dir / "ready").unlink(missing_ok=True)
    log_vcpu_totals(s)


STEPS: tuple[Step, ...] = (
    Step("http", serve_http, stop_http, wanted=lambda s: s.opts.metrics_address is not None),
    Step("run-dir", claim_run_dir, release_run_dir),
    Step("anchor", start_anchor, stop_anchor, wanted=isolated),
    Step("cgroups", obtain_cgroups, release_cgroups, wanted=isolated),
    Step("float", move_to_float, move_back, wanted=isolated),
    Step(
        "disks",
        make_disks,
        nothing,
        wanted=lambda s: any(d.size_gib is not None for d in s.pre.spec.disks),
    ),
    Step("firmware", copy_efi_vars, remove_efi_vars, wanted=lambda s: s.pre.uefi is not None),
    Step("seed", write_seed, remove_seed, wanted=lambda s: s.pre.seed is not None),
    Step(
        "network",
        make_network,
        unmake_network,
        wanted=lambda s: any(n.makes_tap for n in s.pre.spec.nics),
    ),
    Step("plumbing", plumb, unplumb),
    Step("qemu", start_qemu, stop_qemu, undo_timeout=qemu_stop_timeout),
    Step("qmp", connect_qmp, nothing),
    Step("pin", pin, nothing, wanted=isolated),
    Step("cont", resume, stop_running),
)
STEP_NAMES = tuple(step.name for step in STEPS)


# --- helpers -------------------------------------------------------------------------------------


async def _launch(
    s: Startup, name: str, body: Callable[[trio.TaskStatus[object]], Awaitable[None]]
) -> object:
    service, value = await services.launch(s.nursery, name, body)
    s.services.append(service)
    return value


async def _stop_services(s: Startup, *prefixes: str) -> None:
    for service in reversed(list(s.services)):
        if service.name.startswith(prefixes):
            await service.stop()
            s.services.remove(service)
