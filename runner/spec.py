"""The instance spec: what the pod asks for, loaded strictly from JSON.

Unknown fields and wrong types are refused with the field's name: a typo in a spec must not
silently fall back to a default.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from runner import cpus, netrules
from runner.netrules import Port

Accel = Literal["auto", "kvm", "tcg"]
Hugepages = Literal["none", "2M", "1G"]
DiskFormat = Literal["raw", "qcow2"]
DiskCache = Literal["none", "writeback", "writethrough", "directsync", "unsafe"]
ShareCache = Literal["auto", "always", "none"]
NicMode = Literal["tap", "tap-fd"]
NicBinding = Literal["isolated", "masquerade", "passt"]
TopologyMode = Literal["auto", "flat"]
NumaPolicy = Literal["strict", "prefer"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # Linux IFNAMSIZ is 16 with the NUL
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,36}$")  # virtio-fs tags are at most 36 bytes
_PCI = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field."""


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value}")


def _name(_inst: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(
            f"name {value!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )


def _absolute(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value.startswith("/"):
        raise ValueError(f"{attribute.name} must be an absolute path, not {value!r}")


def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IPv4 address") from None


@attrs.frozen(kw_only=True)
class Memory:
    hugepages: Hugepages = "none"
    # Touch all guest RAM at start, while QEMU is still charged to the pod (see README).
    prealloc: bool = True


@attrs.frozen(kw_only=True)
class Boot:
    """Direct kernel boot (kernel, initrd, cmdline), or from one of the disks (its index)
    through its firmware: SeaBIOS (`bios`) or UEFI (`uefi`: OVMF, with its variable store a
    copy of OVMF's template per start, or `efi_vars`, a file on a volume that keeps it)."""

    kernel: str | None = attrs.field(default=None, validator=_absolute)
    initrd: str | None = attrs.field(default=None, validator=_absolute)
    cmdline: str | None = None
    disk: int | None = None
    firmware: Literal["bios", "uefi"] = "bios"
    efi_vars: str | None = attrs.field(default=None, validator=_absolute)

    def __attrs_post_init__(self) -> None:
        if self.efi_vars is not None and self.firmware != "uefi":
            raise ValueError("efi_vars is UEFI's variable store: it needs firmware uefi")
        if self.disk is not None and self.kernel is not None:
            raise ValueError("boot takes a kernel or a disk, not both")
        if self.disk is None and self.kernel is None:
            raise ValueError("boot needs a kernel or a disk")
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise ValueError("boot: initrd and cmdline need a kernel")


_IO_MAX = 1 << 40


@attrs.frozen(kw_only=True)
class IoLimits:
    """Disk IO limits as QEMU's throttling: operations and bytes per second, in total or per
    direction (not both for one kind), with an optional burst ceiling for the totals."""

    iops: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None
    bps: int | None = None
    read_bps: int | None = None
    write_bps: int | None = None
    iops_burst: int | None = None  # iops allowed in a burst (iops-total-max)
    bps_burst: int | None = None

    def __attrs_post_init__(self) -> None:
        given = {k: v for k, v in attrs.asdict(self).items() if v is not None}
        if not given:
            raise ValueError("io needs at least one limit")
        for key, value in given.items():
            if not 1 <= value <= _IO_MAX:
                raise ValueError(f"io {key} {value} must be between 1 and {_IO_MAX}")
        for kind in ("iops", "bps"):
            if kind in given and ({f"read_{kind}", f"write_{kind}"} & given.keys()):
                raise ValueError(f"io {kind} is a total: give it or read_/write_{kind}, not both")
            burst = given.get(f"{kind}_burst")
            if burst is not None and (kind not in given or burst < given[kind]):
                raise ValueError(f"io {kind}_burst needs {kind}, and at least as much")

    def throttling(self) -> list[tuple[str, int]]:
        """QEMU's `throttling.*` drive options."""
        names = {
            "iops": "iops-total",
            "read_iops": "iops-read",
            "write_iops": "iops-write",
            "bps": "bps-total",
            "read_bps": "bps-read",
            "write_bps": "bps-write",
            "iops_burst": "iops-total-max",
            "bps_burst": "bps-total-max",
        }
        return [(names[k], v) for k, v in attrs.asdict(self).items() if v is not None]


@attrs.frozen(kw_only=True)
class Disk:
    """A file or block device by path (`size_gib`: a raw file made sparse at that size when
    missing, as a filesystem volume's `disk.img`), an inherited file descriptor (a host
    agent's), or a read-only base `image` (an image volume's qcow2 or raw) that the guest
    writes through an overlay of its own, made per start in the scratch directory and gone
    when QEMU exits."""

    path: str | None = attrs.field(default=None, validator=_absolute)
    fd: int | None = None
    image: str | None = attrs.field(default=None, validator=_absolute)
    size_gib: int | None = None
    format: DiskFormat = "raw"
    read_only: bool = False
    # None: "none" (O_DIRECT, native AIO) for a block device, else "writeback" (QEMU's)
    cache: DiskCache | None = None
    io: IoLimits | None = None  # this disk's own limits, instead of the instance's group

    def __attrs_post_init__(self) -> None:
        if sum(x is not None for x in (self.path, self.fd, self.image)) != 1:
            raise ValueError("a disk takes exactly one of path, fd and image")
        if self.fd is not None and self.fd < 3:
            raise ValueError(f"disk fd {self.fd} is stdin/stdout/stderr")
        if self.size_gib is not None:
            if self.path is None or self.format != "raw":
                raise ValueError("size_gib makes a raw file at path: not for fd, image or qcow2")
            if not 1 <= self.size_gib <= 65536:
                raise ValueError(f"size_gib {self.size_gib} must be between 1 and 65536")


@attrs.frozen(kw_only=True)
class Bandwidth:
    """Per nic, in the guest's view: `ingress_mbit` towards it (shaped on the tap: htb), and
    `egress_mbit` from it (policed as it enters the tap: nftables' limit)."""

    ingress_mbit: int | None = None
    egress_mbit: int | None = None
    burst_kb: int = 64

    def __attrs_post_init__(self) -> None:
        for name in ("ingress_mbit", "egress_mbit"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 400_000:
                raise ValueError(f"bandwidth {name} {value} must be between 1 and 400000")
        if not 2 <= self.burst_kb <= 1_048_576:
            raise ValueError(f"bandwidth burst_kb {self.burst_kb} must be between 2 and 1048576")
        if self.ingress_mbit is None and self.egress_mbit is None:
            raise ValueError("bandwidth needs ingress_mbit, egress_mbit or both")


@attrs.frozen(kw_only=True)
class Nic:
    """`tap`: the runner makes the tap (name `tap`), gives it the gateway address and serves
    DHCP (and, with `ipv6_prefix`, Router Advertisements and DHCPv6) on it. Its `binding`:
    `isolated`, the guest reaches its tap's gateway only; `masquerade`, the guest is on the pod
    network behind the pod's address (runner.netrules). `tap-fd`: a tap handed over as an
    inherited fd; addressing is the giver's. Binding `passt`: no tap, no NET_ADMIN; passt, a
    user-mode stack, gives the guest the pod's own addresses (IPv4 and IPv6) and forwards the
    pod's ports to it."""

    mode: NicMode = "tap"
    # masquerade for a tap the runner makes (as KubeVirt's default); a tap-fd nic's is the giver's
    binding: NicBinding = attrs.field(
        default=attrs.Factory(
            lambda self: "masquerade" if self.mode == "tap" else "isolated", takes_self=True
        )
    )
    tap: str | None = None
    fd: int | None = None
    mac: str | None = None  # default: stable, derived from the instance name
    ip: str = "10.0.2.2"
    prefix: int = 24
    gateway: str | None = None  # default: the first address of the subnet
    # A /64: the guest's address is its SLAAC one (from its MAC), also given by DHCPv6.
    ipv6_prefix: str | None = None
    ports: tuple[Port, ...] = ()  # masquerade: the ports forwarded to the guest; () = all
    # Default for a masquerade nic: the pod's (its /etc/resolv.conf, its uplink's MTU).
    dns: tuple[str, ...] = ()
    dns6: tuple[str, ...] = ()  # with ipv6_prefix: by DHCPv6 and in Router Advertisements
    search: tuple[str, ...] = ()
    mtu: int | None = None  # None: the pod's uplink's for masquerade, else 1500
    bandwidth: Bandwidth | None = None

    def __attrs_post_init__(self) -> None:
        if self.mode == "tap":
            if self.fd is not None:
                raise ValueError("a nic in mode tap takes no fd (use mode tap-fd)")
            if self.tap is not None and not _IFNAME.match(self.tap):
                raise ValueError(f"tap name {self.tap!r} must be 1-15 letters, digits, . _ -")
        elif self.fd is None or self.fd < 3 or self.tap is not None:
            raise ValueError("a nic in mode tap-fd takes an inherited fd (3 or more), no tap")
        elif self.binding != "isolated" or self.ipv6_prefix is not None:
            raise ValueError("a nic in mode tap-fd takes no binding or ipv6_prefix")
        if self.ports and self.binding == "isolated":
            raise ValueError("ports are forwarded by a masquerade or passt binding only")
        if self.bandwidth is not None and not self.makes_tap:
            raise ValueError(
                "bandwidth is shaped on the tap the runner makes: not for a passt or tap-fd nic"
            )
        if self.binding == "passt" and (self.tap is not None or self.ipv6_prefix is not None):
            raise ValueError("a passt nic takes no tap or ipv6_prefix: it has the pod's addresses")
        if len(set(self.ports)) != len(self.ports):
            raise ValueError("ports must be unique")
        if self.ipv6_prefix is not None:
            _ = self.ipv6_network  # refused here if it is not a unicast /64
        if self.mac is not None and (not _MAC.match(self.mac) or int(self.mac[:2], 16) & 1):
            raise ValueError(f"mac {self.mac!r} must be a unicast address like 52:54:00:12:34:56")
        if not 8 <= self.prefix <= 30:
            raise ValueError(f"prefix {self.prefix} must be between 8 and 30")
        ip = _ipv4(self.ip, "ip")
        net = ipaddress.IPv4Network(f"{ip}/{self.prefix}", strict=False)
        if ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"ip {self.ip} is the network or broadcast address of {net}")
        gw = self.gateway_address
        if gw not in net or gw == ip or gw in (net.network_address, net.broadcast_address):
            raise ValueError(f"gateway {gw} must be another host address in {net}")
        for server in self.dns:
            _ipv4(server, "dns server")
        for server in self.dns6:
            try:
                ipaddress.IPv6Address(server)
            except ValueError:
                raise ValueError(f"dns6 server {server!r} is not an IPv6 address") from None
        if self.dns6 and self.ipv6_prefix is None:
            raise ValueError("dns6 needs an ipv6_prefix: it is handed out by DHCPv6 and RA")
        if len(self.dns) > 3 or len(self.dns6) > 3:
            raise ValueError("at most 3 dns and 3 dns6 servers (as the C library reads them)")
        if self.mtu is not None and not 576 <= self.mtu <= 9000:
            raise ValueError(f"mtu {self.mtu} must be between 576 and 9000")
        for domain in self.search:
            if not netrules.is_domain(domain):
                raise ValueError(f"search domain {domain!r} is not a DNS name")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/{self.prefix}", strict=False)

    @property
    def link_mtu(self) -> int:
        return self.mtu if self.mtu is not None else 1500

    @property
    def makes_tap(self) -> bool:
        """The runner makes this nic's tap, gives it the gateway and serves DHCP on it."""
        return self.mode == "tap" and self.binding != "passt"

    @property
    def ipv6_network(self) -> ipaddress.IPv6Network | None:
        if self.ipv6_prefix is None:
            return None
        try:
            net = ipaddress.IPv6Network(self.ipv6_prefix)
        except ValueError:
            raise ValueError(f"ipv6_prefix {self.ipv6_prefix!r} is not an IPv6 network") from None
        if net.prefixlen != 64 or net.is_multicast or net.is_link_local:
            raise ValueError(f"ipv6_prefix {self.ipv6_prefix} must be a unicast /64 (for SLAAC)")
        return net

    @property
    def gateway6_address(self) -> ipaddress.IPv6Address | None:
        net = self.ipv6_network
        return None if net is None else net.network_address + 1

    @property
    def gateway_address(self) -> ipaddress.IPv4Address:
        if self.gateway is not None:
            return _ipv4(self.gateway, "gateway")
        return self.network.network_address + 1


@attrs.frozen(kw_only=True)
class Share:
    source: str = attrs.field(validator=_absolute)
    tag: str
    read_only: bool = False
    cache: ShareCache = "auto"

    def __attrs_post_init__(self) -> None:
        if not _TAG.match(self.tag):
            raise ValueError(f"share tag {self.tag!r} must be 1-36 letters, digits, . _ -")
        if "," in self.source:
            # QEMU's C virtiofsd cannot take a comma in -o source=.
            raise ValueError(f"share source {self.source!r} must not contain a comma")


def _pci_address(value: object) -> str:
    text = str(value).lower()
    if not _PCI.match(text):
        raise ValueError(f"PCI address {value!r} must look like 0000:65:00.0")
    return text if text.count(":") == 2 else f"0000:{text}"


@attrs.frozen(kw_only=True)
class Device:
    """A host PCI device passed through with VFIO (a GPU, an SR-IOV VF), by its address."""

    address: str = attrs.field(converter=_pci_address)


_KEY = re.compile(r"^(ssh|ecdsa|sk)-[A-Za-z0-9@.+-]+ [A-Za-z0-9+/=]+( [^\n\r]*)?$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@attrs.frozen(kw_only=True)
class CloudInit:
    """cloud-init's NoCloud seed (runner.cloudinit), attached read-only. The files come from a
    Secret or ConfigMap volume and are used as they are; without `meta_data` the runner writes
    it (`instance_id`, the host name, `ssh_authorized_keys`), without `network_config` it
    describes the NICs as the runner configured them."""

    user_data: str | None = attrs.field(default=None, validator=_absolute)
    meta_data: str | None = attrs.field(default=None, validator=_absolute)
    network_config: str | None = attrs.field(default=None, validator=_absolute)
    ssh_authorized_keys: tuple[str, ...] = ()
    # Stays the same across restarts (derived from the name); a new one re-provisions.
    instance_id: str | None = None

    def __attrs_post_init__(self) -> None:
        if len(self.ssh_authorized_keys) > 100:
            raise ValueError("at most 100 ssh_authorized_keys")
        for key in self.ssh_authorized_keys:
            if len(key) > 16384 or not _KEY.match(key):
                raise ValueError(f"ssh key {key[:40]!r}… is not one line of an OpenSSH public key")
        if self.instance_id is not None and not _INSTANCE_ID.match(self.instance_id):
            raise ValueError("instance_id must be 1-128 letters, digits, . _ : -")
        if self.meta_data is not None and (self.instance_id or self.ssh_authorized_keys):
            raise ValueError("instance_id and ssh_authorized_keys go into meta_data: give one")


@attrs.frozen(kw_only=True)
class Console:
    stdout: bool = True  # serial lines on the runner's stdout, prefixed
    log_file: str | None = attrs.field(default=None, validator=_absolute)


@attrs.frozen(kw_only=True)
class Realtime:
    """vCPUs that run SCHED_FIFO (KubeVirt's realtime.mask): vCPU indexes in kernel list
    syntax ("0-1"), and the FIFO priority they get."""

    vcpus: str
    priority: int = 1

    def __attrs_post_init__(self) -> None:
        try:
            chosen = cpus.parse(self.vcpus)
        except cpus.CpuListError:
            raise ValueError(
                f"realtime vcpus {self.vcpus!r} must be vCPU indexes in list syntax, like 0-1,3"
            ) from None
        if not chosen:
            raise ValueError("realtime vcpus must name at least one vCPU")
        if not 1 <= self.priority <= 99:
            raise ValueError(f"realtime priority {self.priority} must be between 1 and 99")

    @property
    def indexes(self) -> frozenset[int]:
        return cpus.parse(self.vcpus)


@attrs.frozen(kw_only=True)
class InstanceSpec:
    name: str = attrs.field(validator=_name)
    vcpus: int = attrs.field(validator=_positive)
    memory_mib: int = attrs.field(validator=_positive)
    accel: Accel = "auto"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    qemu_binary: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = ()
    memory: Memory = Memory()
    boot: Boot | None = None
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    shares: tuple[Share, ...] = ()
    console: Console = Console()
    devices: tuple[Device, ...] = ()
    # auto: guest sockets, cores and threads mirror the host CPUs the pod holds, guest RAM is
    # bound to their NUMA nodes. flat: vCPU i on the pod's i-th CPU, one unbound RAM block.
    topology: TopologyMode = "auto"
    # What a pod that spans NUMA nodes, holds part of a core, or has a device on another
    # node gets: prefer runs it with a warning, strict refuses it.
    numa: NumaPolicy = "prefer"
    realtime: Realtime | None = None
    cloud_init: CloudInit | None = None
    io: IoLimits | None = None  # one throttle group over the disks without their own

    def __attrs_post_init__(self) -> None:
        if self.realtime is not None and max(self.realtime.indexes) >= self.vcpus:
            raise ValueError(
                f"realtime vcpus {self.realtime.vcpus!r}: the guest has only vCPUs "
                f"{cpus.format(range(self.vcpus))}"
            )
        addresses = [d.address for d in self.devices]
        if len(set(addresses)) != len(addresses):
            raise ValueError("device addresses must be unique")
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise ValueError("initrd and cmdline need a kernel")
        if self.boot is not None and self.kernel is not None:
            raise ValueError("give the kernel in boot or at the top level, not both")
        if (
            self.boot is not None
            and self.boot.disk is not None
            and not (0 <= self.boot.disk < len(self.disks))
        ):
            raise ValueError(
                f"boot disk {self.boot.disk} is not one of the {len(self.disks)} disks"
            )
        tags = [s.tag for s in self.shares]
        if len(set(tags)) != len(tags):
            raise ValueError("share tags must be unique")
        taps = [n.tap or f"tap{i}" for i, n in enumerate(self.nics) if n.makes_tap]
        if len(set(taps)) != len(taps):
            raise ValueError("tap names must be unique")
        if sum(n.binding == "masquerade" for n in self.nics) > 1:
            raise ValueError(
                "one nic at most has the masquerade binding, the default for a tap (the pod has "
                'one address): give the others "binding": "isolated" or "passt"'
            )
        fds = [d.fd for d in self.disks if d.fd is not None]
        fds += [n.fd for n in self.nics if n.fd is not None]
        if len(set(fds)) != len(fds):
            raise ValueError("an inherited fd can serve one disk or nic only")

    @property
    def kernel_boot(self) -> Boot | None:
        """The direct kernel boot, from `boot` or the top-level fields."""
        if self.boot is not None:
            return self.boot if self.boot.kernel is not None else None
        if self.kernel is not None:
            return Boot(kernel=self.kernel, initrd=self.initrd, cmdline=self.cmdline)
        return None

    def mac(self, index: int) -> str:
        """The nic's MAC: as given, or stable for this instance name and nic index (locally
        administered, unicast) so a restarted instance keeps its DHCP lease."""
        given = self.nics[index].mac
        if given is not None:
            return given
        digest = hashlib.sha256(f"{self.name}/{index}".encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])

    def guest6(self, index: int) -> ipaddress.IPv6Address | None:
        """The nic's guest IPv6 address: its SLAAC address in `ipv6_prefix`, also its DHCPv6
        lease, so a guest with either client has the same one."""
        net = self.nics[index].ipv6_network
        return None if net is None else netrules.eui64(net, self.mac(index))

    def realtime_priorities(self) -> dict[int, int]:
        """vCPU index -> SCHED_FIFO priority, for the vCPUs the spec makes realtime."""
        if self.realtime is None:
            return {}
        return dict.fromkeys(sorted(self.realtime.indexes), self.realtime.priority)

    def tap_name(self, index: int) -> str:
        return self.nics[index].tap or f"tap{index}"  # as checked unique above


def _strict(kind: type) -> Any:
    """Structure hook that takes values of exactly `kind` (no "2" → 2, no true → 1)."""

    def hook(value: object, _type: object) -> object:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return hook


def _converter() -> cattrs.Converter:
    c = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for kind in (int, str, bool, float):
        c.register_structure_hook(kind, _strict(kind))

    def var_tuple(t: object) -> bool:
        args = get_args(t)
        return get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis

    def items(value: object, t: object) -> tuple[object, ...]:
        # A JSON list only: a string must not pass as a list of characters.
        (inner, _) = get_args(t)
        if not isinstance(value, list):
            raise TypeError(f"expected a list of {getattr(inner, '__name__', inner)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(c.structure(v, inner))
            except Exception as e:
                raise ValueError(f"item {i}: {describe(e)}") from None
        return tuple(out)

    c.register_structure_hook_func(var_tuple, items)
    for address in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        # From a JSON string only (an int would pass as an address).
        c.register_structure_hook(address, lambda v, t: t(_strict(str)(v, str)))
        c.register_unstructure_hook(address, str)
    return c


converter = _converter()


def _format(exc: BaseException, type_: object) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if "not in literal" in str(exc):  # cattrs raises a bare Exception for Literal
        args = getattr(type_, "__args__", ())
        if args and get_origin(args[0]) is Literal:  # an optional one: Literal[...] | None
            args = args[0].__args__
        allowed = ", ".join(str(a) for a in args)
        return f"must be one of {allowed}, not {exc.args[0].split(' not in ')[0]!r}"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown field(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, (TypeError, ValueError)) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)  # type: ignore[arg-type]


def describe(exc: BaseException) -> str:
    """One line naming each failing field, from a cattrs/attrs error."""
    if isinstance(exc, ClassValidationError):
        lines = cattrs.transform_error(exc, path="$", format_exception=_format)
        return "; ".join(_tidy(line) for line in lines)
    return _format(exc, None)


def _tidy(line: str) -> str:
    # cattrs says "expected int @ $.vcpus"; a person reads "field vcpus: expected int".
    message, _, where = line.rpartition(" @ ")
    field = where.removeprefix("$").removeprefix(".")
    return f"field {field}: {message}" if field else message


def load(text: str, source: str = "spec") -> InstanceSpec:
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise SpecError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source} must be a JSON object")
    try:
        return converter.structure(raw, InstanceSpec)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError, TypeError) as e:
        raise SpecError(f"{source}: {describe(e)}") from None


def to_json(spec: InstanceSpec) -> str:
    return json.dumps(converter.unstructure(spec), indent=2)
