"""Command lines of QEMU, dnsmasq, passt and virtiofsd, built from the spec. Pure: the effect layer
decides the file descriptors and socket paths (the `Wiring`) and passes them in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs

from runner import cpus, netrules
from runner.netrules import Port
from runner.placement import Layout
from runner.spec import InstanceSpec, Nic, Share


@attrs.frozen(kw_only=True)
class Wiring:
    """What the runner opened for QEMU: fd numbers as QEMU will see them, socket paths."""

    qmp_fd: int
    console_fd: int | None = None
    nic_fds: tuple[int, ...] = ()  # per nic in spec order: its tap, or its stream to passt
    streams: frozenset[int] = frozenset()  # the nics (indexes) whose fd is a stream
    share_sockets: tuple[str, ...] = ()  # one vhost-user socket per share, in spec order
    seed: str | None = None  # cloud-init's NoCloud ISO
    uefi: tuple[str, str] | None = None  # OVMF's code, and this instance's variable store


def _opt(value: str) -> str:
    """QEMU splits option values on commas; a literal comma is written twice."""
    return value.replace(",", ",,")


def qemu_argv(
    spec: InstanceSpec,
    accel: Literal["kvm", "tcg"],
    wiring: Wiring,
    layout: Layout | None = None,
) -> list[str]:
    """QEMU starts paused (-S): vCPU threads exist but no guest code runs until `cont`, so
    they can be placed before the guest ever executes. `layout`: the guest topology and RAM
    binding of the plan (None: flat, as without isolation)."""
    if len(wiring.nic_fds) != len(spec.nics) or len(wiring.share_sockets) != len(spec.shares):
        raise ValueError("the wiring must have one fd per nic and one socket per share")
    argv = [
        spec.qemu_binary,
        "-S",
        "-name",
        f"{_opt(spec.name)},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    if spec.devices or wiring.uefi is not None:
        argv += ["-machine", "q35"]  # PCIe expander bridges and root ports; OVMF's machine
    if wiring.uefi is not None:
        code, store = wiring.uefi
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(code)}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={_opt(store)}",
        ]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]  # one host thread per vCPU
    smp = str(spec.vcpus)
    if layout is not None and layout.bound:
        smp += f",sockets={layout.sockets},cores={layout.cores},threads={layout.threads}"
    argv += [
        "-smp",
        smp,
        "-m",
        f"{spec.memory_mib}M",
        "-chardev",
        f"socket,id=qmp,fd={wiring.qmp_fd}",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    argv += _memory(spec, layout)
    argv += _devices(spec, layout)
    if wiring.console_fd is not None:
        argv += [
            "-chardev",
            f"socket,id=console,fd={wiring.console_fd}",
            "-serial",
            "chardev:console",
        ]
    boot_disk = spec.boot.disk if spec.boot is not None else None
    for i, disk in enumerate(spec.disks):
        path = disk.path or disk.image or f"/dev/fdset/{i + 1}"
        if disk.fd is not None:
            argv += ["-add-fd", f"fd={disk.fd},set={i + 1}"]
        cache = disk.cache or "writeback"
        drive = (
            f"if=none,id=disk{i},file={_opt(path)},format={disk.format},cache={cache},"
            f"readonly={'on' if disk.read_only else 'off'}"
        )
        if cache == "none":
            drive += ",aio=native"  # O_DIRECT: native AIO does not block QEMU's threads
        if disk.image is not None and not disk.read_only:
            drive += ",snapshot=on"  # the overlay: in QEMU's TMPDIR, unlinked once open
        limits, group = (disk.io, f"disk{i}") if disk.io is not None else (spec.io, "instance")
        if limits is not None:
            drive += "".join(f",throttling.{k}={v}" for k, v in limits.throttling())
            drive += f",throttling.group={group}"
        argv += [
            "-drive",
            drive,
            "-device",
            f"virtio-blk-pci,drive=disk{i}" + (",bootindex=0" if boot_disk == i else ""),
        ]
    if wiring.seed is not None:
        argv += [
            "-drive",
            f"if=none,id=seed,file={_opt(wiring.seed)},format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=seed",
        ]
    for i, nic in enumerate(spec.nics):
        fd = wiring.nic_fds[i]
        netdev = (
            f"stream,id=net{i},server=off,addr.type=fd,addr.str={fd}"
            if i in wiring.streams
            else f"tap,id=net{i},fd={fd}"
        )
        argv += [
            "-netdev",
            netdev,
            "-device",
            f"virtio-net-pci,netdev=net{i},mac={spec.mac(i)},host_mtu={nic.link_mtu}",
        ]
    for i, share in enumerate(spec.shares):
        argv += [
            "-chardev",
            f"socket,id=fs{i},path={_opt(wiring.share_sockets[i])}",
            "-device",
            f"vhost-user-fs-pci,chardev=fs{i},tag={share.tag}",
        ]
    kernel = spec.kernel_boot
    if kernel is not None:
        assert kernel.kernel is not None
        argv += ["-kernel", kernel.kernel]
        if kernel.initrd is not None:
            argv += ["-initrd", kernel.initrd]
        if kernel.cmdline is not None:
            argv += ["-append", kernel.cmdline]
    argv += list(spec.extra_args)
    return argv


def _memory(spec: InstanceSpec, layout: Layout | None) -> list[str]:
    """Guest RAM as explicit backends: shared (memfd) when virtiofsd must map it, on huge
    pages when asked, preallocated so it is charged while QEMU is still in the pod's cgroup,
    and with a plan's layout one per guest NUMA node, bound to its host node."""
    mem = spec.memory
    shared = bool(spec.shares)
    bound = layout is not None and layout.bound
    if not (shared or mem.hugepages != "none" or mem.prealloc or bound):
        return []
    backend = "memory-backend-memfd" if shared or mem.hugepages != "none" else "memory-backend-ram"

    def props(name: str, mib: int, vcpus: int) -> list[str]:
        out = [f"{backend},id={name},size={mib}M"]
        if shared:
            out.append("share=on")
        if mem.hugepages != "none":
            out.append(f"hugetlb=on,hugetlbsize={mem.hugepages}")
        if mem.prealloc:
            # One thread per vCPU: a large guest's RAM is touched in time for QMP's deadline.
            out.append(f"prealloc=on,prealloc-threads={vcpus}")
        return out

    if layout is None or not layout.bound:
        return [
            "-object",
            ",".join(props("mem", spec.memory_mib, spec.vcpus)),
            "-numa",
            "node,memdev=mem",
        ]
    argv = []
    for i, node in enumerate(layout.nodes):
        # bind, not preferred: a guest node's RAM never silently lands on another host node.
        parts = props(f"mem{i}", node.memory_mib, len(node.vcpus))
        if node.host_node is not None:
            parts.append(f"host-nodes={node.host_node},policy=bind")
        ranges = ",".join(f"cpus={r}" for r in cpus.format(node.vcpus).split(","))
        argv += [
            "-object",
            ",".join(parts),
            "-numa",
            f"node,nodeid={i},{ranges},memdev=mem{i}",
        ]
    return argv


def _devices(spec: InstanceSpec, layout: Layout | None) -> list[str]:
    """VFIO devices, each behind a PCIe root port; one on a host node the guest mirrors sits
    behind an expander bridge on that guest node, so the guest's driver sees its locality."""
    argv: list[str] = []
    nodes = layout.device_nodes if layout is not None else ()
    bridges: set[int] = set()
    for k, device in enumerate(spec.devices):
        node = nodes[k] if k < len(nodes) else None
        bus = "pcie.0"
        if node is not None:
            bus = f"pxb{node}"
            if node not in bridges:
                bridges.add(node)
                # Bus numbers above pcie.0's, 16 apart: room for each expander's ports.
                argv += [
                    "-device",
                    f"pxb-pcie,id=pxb{node},bus_nr={128 + 16 * node},numa_node={node},bus=pcie.0",
                ]
        argv += [
            "-device",
            f"pcie-root-port,id=rp{k},bus={bus},chassis={k + 1},slot=0",
            "-device",
            f"vfio-pci,host={device.address},bus=rp{k},id=dev{k}",
        ]
    return argv


def dnsmasq_argv(spec: InstanceSpec, index: int, binary: str = "dnsmasq") -> list[str]:
    """DHCP for one guest on one tap: a single static lease, no DNS service, nothing written.
    With an IPv6 prefix also Router Advertisements (prefix for SLAAC, default route) and
    DHCPv6 of that same one address, so that a guest with either client gets it."""
    nic: Nic = spec.nics[index]
    options = [
        f"--dhcp-option=option:router,{nic.gateway_address}",
        f"--dhcp-option=option:mtu,{nic.link_mtu}",
    ]
    if nic.dns:
        options.append(f"--dhcp-option=option:dns-server,{','.join(nic.dns)}")
    if nic.search:
        options.append(f"--dhcp-option=option:domain-search,{','.join(nic.search)}")
    if hostname := netrules.hostname(spec.name):
        options.append(f"--dhcp-option=12,{hostname}")  # dnsmasq has no name for it
    guest6 = spec.guest6(index)
    if guest6 is not None:
        options += ["--enable-ra", f"--dhcp-range={guest6},{guest6},slaac,64"]
        if nic.dns6:  # also sent as RDNSS in the Router Advertisements
            servers = ",".join(f"[{a}]" for a in nic.dns6)
            options.append(f"--dhcp-option=option6:dns-server,{servers}")
        if nic.search:
            options.append(f"--dhcp-option=option6:domain-search,{','.join(nic.search)}")
    return [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--pid-file",  # none: a pod's /var/run may be read-only, and several may run
        "--port=0",
        f"--interface={spec.tap_name(index)}",
        "--bind-interfaces",
        f"--dhcp-range={nic.ip},static,{nic.network.netmask}",
        f"--dhcp-host={spec.mac(index)},{nic.ip},infinite",
        "--dhcp-authoritative",
        "--leasefile-ro",
        "--log-facility=-",
        "--log-dhcp",
        *options,
    ]


def _passt_ports(ports: Sequence[Port], protocol: str, reserved: Sequence[Port]) -> str:
    """passt's port spec: the listed ports, or every one but the runner's own."""
    if ports:
        listed = sorted(p.port for p in ports if p.protocol == protocol)
        return ",".join(map(str, listed)) if listed else "none"
    excluded = sorted(p.port for p in reserved if p.protocol == protocol)
    return ",".join(f"~{p}" for p in excluded) if excluded else "all"


def passt_argv(
    spec: InstanceSpec, index: int, fd: int, binary: str, reserved: Sequence[Port] = ()
) -> list[str]:
    """passt for one nic, in the foreground, logging to stderr, on `fd`: its end of a
    connected socketpair whose other end is QEMU's.
    It forwards the pod's ports to the guest: the listed ones, or all that are free when it
    starts (the runner's own are bound already, and excluded besides). The gateway is the
    pod's real one: passt's default maps it to the pod's loopback, which would open the
    runner's ports and every loopback service of the pod to the guest."""
    nic = spec.nics[index]
    return [
        binary,
        "--foreground",
        "--stderr",
        "--fd",
        str(fd),
        "--mtu",
        str(nic.link_mtu),
        "--no-map-gw",
        "--tcp-ports",
        _passt_ports(nic.ports, "tcp", reserved),
        "--udp-ports",
        _passt_ports(nic.ports, "udp", reserved),
    ]


def virtiofsd_argv(
    share: Share,
    socket: str,
    binary: str,
    flavour: Literal["c", "rust"],
    sandbox: Literal["namespace", "chroot"] = "namespace",
    mounted_read_only: bool = False,
) -> list[str]:
    """virtiofsd for one share. The C daemon (Debian's) has no read-only mode, so a read-only
    share is served from a read-only bind mount of the source in a private mount namespace,
    unless the source is on a read-only mount already (`mounted_read_only`). `sandbox`: chroot
    where making namespaces is not allowed (no CAP_SYS_ADMIN: a pod that is not privileged)."""
    if flavour == "rust":
        argv = [
            binary,
            f"--socket-path={socket}",
            f"--shared-dir={share.source}",
            f"--cache={share.cache}",
            *(["--sandbox=chroot"] if sandbox == "chroot" else []),
        ]
        return [*argv, "--readonly"] if share.read_only else argv
    argv = [
        binary,
        f"--socket-path={socket}",
        "-o",
        f"source={_opt(share.source)}",
        "-o",
        f"cache={share.cache}",
        *(["-o", "sandbox=chroot"] if sandbox == "chroot" else []),
    ]
    if not share.read_only or mounted_read_only:
        return argv
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        'mount --bind -o ro "$0" "$0" && exec "$@"',
        share.source,
        *argv,
    ]
