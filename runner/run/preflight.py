"""Everything that can be refused is refused here, before anything runs. The result is
frozen: the steps after it only act on what was decided."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path
from typing import Literal

import attrs

from runner import cloudinit, cpus, kube, mounts, netrules, placement, plan, spec, topology
from runner.log import log
from runner.node import procfs
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.run.cgroupsource import CgroupSource, make_source
from runner.run.options import RUN_DIR_BASE, Options, StartupError

VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "virtiofsd")
KVM_GET_API_VERSION = 0xAE00


@attrs.frozen
class Isolation:
    """What isolation needs: the container cgroup, the pod, the plan, the cgroups' source."""

    cg: CgroupFS
    container: str  # our container's cgroup path, read before any move
    pod: kube.PodCgroup
    plan: plan.Plan
    source: CgroupSource


@attrs.frozen
class ShareServer:
    """How virtiofsd serves the spec's shares."""

    binary: str  # "" when there are no shares
    flavour: Literal["c", "rust"] = "c"
    sandbox: Literal["namespace", "chroot"] = "namespace"  # chroot: no CAP_SYS_ADMIN
    # Read-only shares with nothing writable mounted there or below (a volume mounted
    # readOnly): served as they are, with no bind mount of ours.
    as_mounted: frozenset[str] = frozenset()


@attrs.frozen
class Prepared:
    spec: spec.InstanceSpec
    accel: Literal["kvm", "tcg"]
    run_dir: Path
    boots_os: bool  # a kernel or a disk: something that can answer the power button
    dnsmasq: str  # "" when no nic needs it
    nft: str  # "" when no rules are ours to apply
    passt: str  # "" when no nic has the passt binding
    shares: ShareServer
    isolation: Isolation | None  # None: --isolation off
    seed: bytes | None = None  # cloud-init's NoCloud ISO, when the spec has cloud_init
    scratch_dir: str = "/var/tmp"  # QEMU's TMPDIR: image disks' overlays
    uefi: tuple[str, str] | None = None  # OVMF's code and variable store template

    @property
    def iso(self) -> Isolation:
        assert self.isolation is not None, "a step that needs isolation ran without it"
        return self.isolation


def _helper(name: str, path: str, needed_by: str, needed: bool) -> str:
    """The helper binary's path if the spec needs it ("" if not); refused if it is missing."""
    if not needed:
        return ""
    found = shutil.which(path)
    if found is None:
        raise StartupError(f"{name} binary {path!r} not found (needed by {needed_by})")
    return found


def pod_network(nics: tuple[spec.Nic, ...]) -> tuple[spec.Nic, ...]:
    """A masquerade nic takes what the spec leaves out from its pod: the MTU of the pod's
    uplink (the interface of its default route), the pod's DNS servers and search domains."""
    if not any(
        n.binding == "masquerade"
        and (n.mtu is None or not n.dns or (not n.dns6 and n.ipv6_prefix is not None))
        for n in nics
    ):
        return nics
    try:
        resolver = netrules.parse_resolv_conf(procfs.read("/etc/resolv.conf"))
    except OSError:
        resolver = netrules.Resolver()
    mtu = None
    try:
        uplink = netrules.default_interface(procfs.read("/proc/net/route"))
        if uplink is not None:
            mtu = min(max(int(procfs.read(f"/sys/class/net/{uplink}/mtu")), 576), 9000)
    except (OSError, ValueError):
        pass
    out = []
    for nic in nics:
        if nic.binding == "masquerade":
            dns = nic.dns or tuple(str(a) for a in resolver.nameservers if a.version == 4)
            dns6 = nic.dns6
            if not dns6 and nic.ipv6_prefix is not None:
                dns6 = tuple(str(a) for a in resolver.nameservers if a.version == 6)
            nic = attrs.evolve(
                nic,
                mtu=nic.mtu if nic.mtu is not None else mtu,
                dns=dns,
                dns6=dns6,
                search=nic.search or (resolver.search if not nic.dns else ()),
            )
            log.info(
                "pod-network",
                mtu=nic.link_mtu,
                dns=",".join(dns),
                dns6=",".join(dns6),
                search=" ".join(nic.search),
            )
        out.append(nic)
    return tuple(out)


SEED_FILE_MAX = 1 << 20  # bytes of one cloud-init file (cloud-init's own limits are lower)


def _seed_input(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(SEED_FILE_MAX + 1)
    except OSError as e:
        raise StartupError(f"cannot read cloud_init {what} {path}: {e.strerror}") from None
    if len(data) > SEED_FILE_MAX:
        raise StartupError(f"cloud_init {what} {path} is over {SEED_FILE_MAX >> 20} MiB")
    return data


def uefi_firmware(the_spec: spec.InstanceSpec, o: Options) -> tuple[str, str] | None:
    boot = the_spec.boot
    if boot is None or boot.firmware != "uefi":
        return None
    for path in (o.ovmf_code, o.ovmf_vars):
        if not Path(path).is_file():
            raise StartupError(f"UEFI firmware {path} not found (Debian's package ovmf has it)")
    if boot.efi_vars is not None and not Path(boot.efi_vars).parent.is_dir():
        raise StartupError(f"boot efi_vars {boot.efi_vars}: its directory does not exist")
    return o.ovmf_code, o.ovmf_vars


def cloud_init_seed(the_spec: spec.InstanceSpec) -> bytes | None:
    """The NoCloud ISO, built before anything runs: a missing file is refused here."""
    ci = the_spec.cloud_init
    if ci is None:
        return None
    files = cloudinit.seed_files(
        the_spec,
        _seed_input(ci.user_data, "user_data"),
        _seed_input(ci.network_config, "network_config"),
    )
    if (meta := _seed_input(ci.meta_data, "meta_data")) is not None:
        files["meta-data"] = meta
    log.info("cloud-init-seed", instance_id=cloudinit.instance_id(the_spec), files=len(files))
    return cloudinit.iso(files)


def preflight(o: Options) -> Prepared:
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
    the_spec = attrs.evolve(the_spec, disks=disks_as_found(the_spec.disks, o.scratch_dir))
    qemu_path = shutil.which(the_spec.qemu_binary)
    if qemu_path is None:
        raise StartupError(f"QEMU binary {the_spec.qemu_binary!r} not found")
    the_spec = attrs.evolve(the_spec, qemu_binary=qemu_path, nics=pod_network(the_spec.nics))
    accel: Literal["kvm", "tcg"] = (
        the_spec.accel if the_spec.accel != "auto" else ("kvm" if kvm_usable() else "tcg")
    )
    nics = the_spec.nics
    dnsmasq = _helper("dnsmasq", o.dnsmasq, "the spec's tap nics", any(n.makes_tap for n in nics))
    nft = _helper(
        "nft",
        o.nft,
        "a masquerade nic or a bandwidth limit",
        # In controller mode the controller applies the rules.
        not o.controller_socket
        and any(n.binding == "masquerade" or n.bandwidth is not None for n in nics),
    )
    passt = _helper("passt", o.passt, "a passt nic", any(n.binding == "passt" for n in nics))
    shares = share_server(the_spec, o.virtiofsd)
    host = read_host() if o.isolation == "on" or the_spec.devices else None
    if the_spec.devices:
        assert host is not None
        check_vfio(host, the_spec)
    isolation = isolate(o, the_spec, host) if host is not None and o.isolation == "on" else None
    if the_spec.realtime is not None:
        check_realtime(isolation is not None)
    name = isolation.pod.pod_uid if isolation is not None else the_spec.name
    run_dir = Path(o.run_dir) if o.run_dir else Path(RUN_DIR_BASE) / name
    if the_spec.shares:
        longest = str(run_dir / f"virtiofs-{len(the_spec.shares)}.sock")
        if len(longest.encode()) > 107:
            raise StartupError(
                f"--run-dir {run_dir} is too long for the virtiofs sockets "
                "in it (Unix socket paths are at most 107 bytes)"
            )
    seed = cloud_init_seed(the_spec)
    pre = Prepared(
        spec=the_spec,
        accel=accel,
        run_dir=run_dir,
        boots_os=the_spec.kernel_boot is not None or bool(the_spec.disks),
        dnsmasq=dnsmasq,
        nft=nft,
        passt=passt,
        shares=shares,
        isolation=isolation,
        seed=seed,
        scratch_dir=o.scratch_dir,
        uefi=uefi_firmware(the_spec, o),
    )
    if isolation is None:
        log.warning(
            "isolation-off",
            detail="no cgroups, no pinning: vCPUs share every CPU "
            "with everything else (for trying the runner, not for production)",
        )
        log.info("plan", name=the_spec.name, accel=accel, isolation="off", run_dir=str(run_dir))
    else:
        log.info(
            "plan",
            name=the_spec.name,
            pod_uid=isolation.pod.pod_uid,
            container=isolation.container,
            driver=isolation.pod.driver,
            instance_cpus=cpus.format(isolation.plan.instance_cpus),
            guest=plan.describe(isolation.plan.layout),
            accel=accel,
            mode="controller" if o.controller_socket else "embedded",
            run_dir=str(run_dir),
        )
    if isolation is not None:
        for warning in isolation.plan.layout.warnings:
            log.warning("placement", detail=warning, numa=the_spec.numa)
    return pre


def read_host() -> topology.Host:
    try:
        return topology.read_host()
    except topology.TopologyError as e:
        raise StartupError(str(e)) from None


def check_vfio(host: topology.Host, the_spec: spec.InstanceSpec) -> None:
    """Each device usable by VFIO: bound to vfio-pci with its whole group, and its group's
    /dev/vfio node there for QEMU (the device plugin's job in a pod) and not in use."""
    try:
        found = placement.check_devices(host, [d.address for d in the_spec.devices])
    except placement.PlacementError as e:
        raise StartupError(str(e)) from None
    for dev in found:
        path = f"/dev/vfio/{dev.iommu_group}"
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            why = "in use by another process" if e.errno == errno.EBUSY else e.strerror
            raise StartupError(f"device {dev.address}: cannot open {path}: {why}") from None


def isolate(o: Options, the_spec: spec.InstanceSpec, host: topology.Host) -> Isolation:
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
    if o.controller_socket:
        check_socket_mount(o.controller_socket)
        if o.partition != "none":
            raise StartupError(
                "--partition is the controller's in controller mode (its own --partition)"
            )
    try:
        # /proc/self follows the thread-group leader: read it now, before any move.
        own = kube.own_cgroup_path(
            _read_optional("/proc/self/cpuset"), _read_optional("/proc/self/cgroup")
        )
        pod = own_pod(own, o)
        container_cpus = cg.cpus(own)
        source = make_source(
            cg, root, o.kubelet_dir, pod, o.controller_socket, o.controller_timeout, o.partition
        )
        the_plan = plan.make_plan(
            the_spec,
            pod,
            container_cpus,
            source.shared_cpus(),
            host,
            allow_spare_cpus=o.allow_spare_cpus,
        )
    except (kube.KubeError, plan.PlanError, CgroupError) as e:
        raise StartupError(str(e)) from None
    return Isolation(cg, own, pod, the_plan, source)


def own_pod(own: str, o: Options) -> kube.PodCgroup:
    """The pod, from the container's cgroup path; in a private cgroup namespace (a container
    that is not privileged) the path is "/" and says nothing: the pod is the one it is told
    (--pod-uid), and only the controller, which sees the node, can act for it."""
    if own != "/":
        return kube.parse_pod_cgroup(own)
    if not o.controller_socket:
        raise StartupError(
            "the container has a private cgroup namespace (it is not privileged): the node's "
            "cgroups are out of reach, so run it with --controller-socket (the controller "
            "makes the writes), or privileged for embedded mode"
        )
    if not o.pod_uid:
        raise StartupError(
            "the container has a private cgroup namespace, so its cgroup does not name its "
            "pod: give --pod-uid (env INSTANCE_RUNNER_POD_UID, from the Downward API's "
            "metadata.uid)"
        )
    return kube.in_namespace(o.pod_uid)


def check_realtime(isolated: bool) -> None:
    try:
        runtime, period = procfs.rt_throttling()
        plan.check_realtime(isolated, runtime, period)
    except OSError as e:
        raise StartupError(f"realtime vCPUs: cannot read RT throttling: {e}") from None
    except plan.PlanError as e:
        raise StartupError(str(e)) from None
    # A PREEMPT_RT kernel says so here; FIFO vCPUs work on others too, with longer latencies.
    preempt_rt = _read_optional("/sys/kernel/realtime") == "1\n"
    log.info("realtime", rt_runtime_us=runtime, rt_period_us=period, preempt_rt=preempt_rt)


def check_socket_mount(socket_path: str) -> None:
    """The controller's socket must come in with its directory: a restarted controller makes
    a new socket, which a mount of the old socket file never shows."""
    info = _read_optional("/proc/self/mountinfo") or ""
    if mounts.is_file_mount(socket_path, info):
        raise StartupError(
            f"--controller-socket {socket_path} is mounted as a file: after a controller "
            "restart it would name a dead socket; mount the socket's directory instead "
            "(a hostPath volume of type Directory)"
        )


def disks_as_found(disks: tuple[spec.Disk, ...], scratch: str) -> tuple[spec.Disk, ...]:
    """Each disk's cache as its kind wants it (O_DIRECT for a block device); a missing
    `size_gib` disk checked against its volume (made in the `disks` step); the scratch
    directory checked when an image disk needs it."""
    out = []
    for i, disk in enumerate(disks):
        path = disk.path or disk.image
        if disk.cache is None and path is not None:
            try:
                block = stat.S_ISBLK(os.stat(path).st_mode)
            except OSError:
                block = False
            disk = attrs.evolve(disk, cache="none" if block else "writeback")
        if disk.size_gib is not None and disk.path is not None and not Path(disk.path).exists():
            parent = Path(disk.path).parent
            try:
                vfs = os.statvfs(parent)
            except OSError as e:
                raise StartupError(f"disk {i}: cannot make {disk.path}: {e.strerror}") from None
            if vfs.f_blocks * vfs.f_frsize < disk.size_gib << 30:
                have = vfs.f_blocks * vfs.f_frsize / (1 << 30)
                raise StartupError(
                    f"disk {i}: the volume at {parent} holds {have:.1f} GiB, "
                    f"less than size_gib {disk.size_gib}"
                )
        if disk.image is not None and not disk.read_only and not os.access(scratch, os.W_OK):
            raise StartupError(
                f"disk {i}: the overlay of image {disk.image} needs a writable "
                f"--scratch-dir, and {scratch} is not"
            )
        out.append(disk)
    return tuple(out)


def _ours_or_absent(name: str) -> bool:
    """No device of the name, or a persistent tap of ours that a killed runner of this pod
    left (the network step replaces it, and refuses it while someone holds it open)."""
    dev = Path(f"/sys/class/net/{name}")
    if not dev.exists():
        return True
    try:
        return procfs.read(dev / "owner").strip() == str(os.geteuid())
    except OSError:
        return False  # no owner file: not a tap


def check_guest_resources(the_spec: spec.InstanceSpec, inherited: frozenset[int]) -> None:
    """Files and fds the spec names must be there before anything starts. An fd must be one
    the runner inherited (numbers above 2 may be trio's own by now)."""
    for i, disk in enumerate(the_spec.disks):
        if disk.path is not None and disk.size_gib is None and not Path(disk.path).exists():
            raise StartupError(f"disk {i}: {disk.path} does not exist")
        if disk.image is not None and not Path(disk.image).exists():
            raise StartupError(f"disk {i}: image {disk.image} does not exist")
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
        if nic.makes_tap and not _ours_or_absent(the_spec.tap_name(i)):
            raise StartupError(f"nic {i}: network device {the_spec.tap_name(i)} already exists")
    for share in the_spec.shares:
        if not Path(share.source).is_dir():
            raise StartupError(f"share {share.tag}: {share.source} is not a directory")
    boot = the_spec.kernel_boot
    for path in (boot.kernel, boot.initrd) if boot else ():
        if path is not None and not Path(path).is_file():
            raise StartupError(f"boot: {path} does not exist")


CAP_SYS_ADMIN = 21


def share_server(the_spec: spec.InstanceSpec, wanted: str | None) -> ShareServer:
    if not the_spec.shares:
        return ShareServer("")
    binary, flavour = find_virtiofsd(wanted)
    can_bind = has_capability(CAP_SYS_ADMIN)
    return ShareServer(
        binary,
        flavour,
        "namespace" if can_bind else "chroot",
        read_only_as_mounted(the_spec, flavour, can_bind),
    )


def read_only_as_mounted(
    the_spec: spec.InstanceSpec, flavour: Literal["c", "rust"], can_bind: bool
) -> frozenset[str]:
    """The read-only shares the C virtiofsd (which has no read-only mode) can serve as they
    are: no mount it would see there is writable (a volume mounted readOnly, with nothing
    writable below it). The others need our read-only bind mount, which hides what is below
    it but takes CAP_SYS_ADMIN; without it they are refused."""
    if flavour == "rust":
        return frozenset()  # --readonly
    mountinfo = procfs.read("/proc/self/mountinfo")
    out = set()
    for share in (s for s in the_spec.shares if s.read_only):
        writable = mounts.writable_mounts(os.path.realpath(share.source), mountinfo)
        if not writable:
            out.add(share.source)
        elif not can_bind:
            raise StartupError(
                f"share {share.tag}: read-only, but {writable[0]} is a writable mount there, "
                "and making it read-only takes a bind mount in a mount namespace of its own "
                "(CAP_SYS_ADMIN, which this container lacks): mount the volume into the "
                "container read-only (volumeMounts readOnly: true), and nothing writable below it"
            )
    return frozenset(out)


def has_capability(cap: int) -> bool:
    """Whether this process has `cap` in its effective set (/proc/self/status CapEff)."""
    for line in procfs.read("/proc/self/status").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def find_virtiofsd(wanted: str | None) -> tuple[str, Literal["c", "rust"]]:
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


def _read_optional(path: str) -> str | None:
    try:
        return procfs.read(path)
    except FileNotFoundError:
        return None


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
