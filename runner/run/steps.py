"""Start-up as data: the ordered steps, each a (name, do, undo). The supervisor pushes a
step's undo before it runs the step, so an undo must cope with a step that stopped half-way;
teardown runs the undos in reverse. The same list names the `--pause-before` checkpoints and
the README's account of start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from runner import cpus, httpd, kube, netrules, plan, plumbing, podnet
from runner.argv import Wiring, dnsmasq_argv, passt_argv, tc_shape, virtiofsd_argv
from runner.log import log
from runner.node import procfs
from runner.node.cgroupfs import CgroupError
from runner.node.pinning import Keeper, PinError, check_placed
from runner.plan import Placed
from runner.procs import Child, Reaper
from runner.run import services
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
    sysctls: podnet.Sysctls = attrs.Factory(podnet.Sysctls)  # as they were before us
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
            fd = plumbing.create_tap(name)
            s.tap_fds.append(fd)
            nic_fds.append(fd)
            commands = [
                ["ip", "address", "add", f"{nic.gateway_address}/{nic.prefix}", "dev", name],
                ["ip", "link", "set", "dev", name, "mtu", str(nic.link_mtu), "up"],
            ]
            if nic.gateway6_address is not None:  # no DAD: the tap is ours alone
                gw6 = f"{nic.gateway6_address}/64"
                commands.insert(1, ["ip", "-6", "address", "add", gw6, "dev", name, "nodad"])
            for argv in commands:
                await plumbing.run_command(s.reaper, s.nursery, argv)
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
    s.wiring = Wiring(
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


# --- masquerade: the guest on the pod network, behind the pod's address --------------------------


def _reserved(o: Options) -> tuple[netrules.Port, ...]:
    """The runner's own ports: never forwarded to the guest."""
    if o.metrics_address is None:
        return ()
    return (netrules.Port(port=httpd.parse_address(o.metrics_address)[1]),)


async def masquerade(s: Startup) -> None:
    the_spec = s.pre.spec
    for i, nic in enumerate(the_spec.nics):
        if nic.binding != "masquerade":
            continue
        tap, guest6 = the_spec.tap_name(i), the_spec.guest6(i)
        rules = netrules.Masquerade(
            tap=tap,
            guest4=ipaddress.IPv4Address(nic.ip),
            gateway4=nic.gateway_address,
            guest6=guest6,
            ports=nic.ports,
            reserved=_reserved(s.opts),
        )
        try:
            s.sysctls.write(podnet.sysctls(tap, guest6 is not None))
            doc = netrules.ruleset(rules)
            await podnet.nft(s.reaper, s.nursery, s.pre.nft, doc, s.pre.run_dir / "nft.json")
        except plumbing.PlumbingError as e:
            raise StartupError(str(e)) from None
        ports = ",".join(f"{p.port}/{p.protocol}" for p in nic.ports) or "all"
        log.info("masquerade-ready", tap=tap, guest=nic.ip, guest6=str(guest6), ports=ports)


async def unmasquerade(s: Startup) -> None:
    try:
        doc = netrules.removal()
        await podnet.nft(s.reaper, s.nursery, s.pre.nft, doc, s.pre.run_dir / "nft.json")
    except (plumbing.PlumbingError, OSError) as e:
        log.warning("nft-table-left", table=netrules.TABLE, error=str(e))
    s.sysctls.restore()


# --- bandwidth: shaped towards each guest, policed from it ---------------------------------------


def _egress(s: Startup) -> list[netrules.Limit]:
    the_spec = s.pre.spec
    return [
        netrules.Limit(
            tap=the_spec.tap_name(i), mbit=n.bandwidth.egress_mbit, burst_kb=n.bandwidth.burst_kb
        )
        for i, n in enumerate(the_spec.nics)
        if n.bandwidth is not None and n.bandwidth.egress_mbit is not None
    ]


async def limit_bandwidth(s: Startup) -> None:
    the_spec = s.pre.spec
    try:
        for i, nic in enumerate(the_spec.nics):
            bw = nic.bandwidth
            if bw is not None and bw.ingress_mbit is not None:
                for argv in tc_shape(the_spec.tap_name(i), bw.ingress_mbit, bw.burst_kb):
                    await plumbing.run_command(s.reaper, s.nursery, argv)
        if egress := _egress(s):
            doc = netrules.limits(egress)
            await podnet.nft(s.reaper, s.nursery, s.pre.nft, doc, s.pre.run_dir / "nft.json")
    except plumbing.PlumbingError as e:
        raise StartupError(str(e)) from None
    for i, nic in enumerate(the_spec.nics):
        if nic.bandwidth is not None:
            log.info(
                "bandwidth-limited",
                tap=the_spec.tap_name(i),
                ingress_mbit=nic.bandwidth.ingress_mbit,
                egress_mbit=nic.bandwidth.egress_mbit,
                burst_kb=nic.bandwidth.burst_kb,
            )


async def unlimit_bandwidth(s: Startup) -> None:
    """The qdiscs go with the taps; the netdev table is ours to delete."""
    if not _egress(s):
        return
    try:
        doc = netrules.limits_removal()
        await podnet.nft(s.reaper, s.nursery, s.pre.nft, doc, s.pre.run_dir / "nft.json")
    except (plumbing.PlumbingError, OSError) as e:
        log.warning("nft-table-left", table=netrules.TABLE, family="netdev", error=str(e))


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
    Step("plumbing", plumb, unplumb),
    Step(
        "bandwidth",
        limit_bandwidth,
        unlimit_bandwidth,
        wanted=lambda s: any(n.bandwidth is not None for n in s.pre.spec.nics),
    ),
    Step(
        "masquerade",
        masquerade,
        unmasquerade,
        wanted=lambda s: any(n.binding == "masquerade" for n in s.pre.spec.nics),
    ),
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
