"""Where each vCPU runs and what the guest is told about it. Pure: a `Host` and the pod's CPUs
in, a `Layout` (guest sockets/cores/threads, vCPU -> host CPU, guest NUMA nodes with their RAM
and host node) or a PlanError out.

The rules:
- the guest gets threads = T only when every core the pod holds is whole (all T hyperthreads),
  so two host CPUs that are not siblings are never shown as siblings;
- guest siblings land on host siblings: vCPU indexes run threads fastest, as QEMU numbers them;
- one guest NUMA node (and one socket) per host node spanned, its RAM bound to that node and
  sized in proportion to its vCPUs;
- a pod that spans nodes, holds part of a core, or has a device on another node runs with a
  warning under `prefer` and is refused under `strict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import attrs

from runner import cpus
from runner.cpus import CpuSet
from runner.topology import Host, PciDevice

PAGE_MIB = {"none": 1, "2M": 2, "1G": 1024}
VFIO_DRIVER = "vfio-pci"
HARMLESS_DRIVERS = (None, VFIO_DRIVER, "pci-stub")  # what VFIO lets share a device's group
MAX_DEVICE_NODES = 8  # guest nodes with a device: bus_nr 128 + 16 * node must fit a byte
PCI_BRIDGE_CLASS = 0x0604  # class >> 8


class PlacementError(ValueError):
    """Nothing fits as asked; the message names the CPUs, nodes or devices."""


@attrs.frozen
class GuestNode:
    vcpus: tuple[int, ...]  # guest vCPU indexes, ascending
    memory_mib: int
    host_node: int | None  # where its RAM is bound; None: not bound (one node, or flat)


@attrs.frozen
class Layout:
    sockets: int
    cores: int  # per socket
    threads: int  # per core
    placement: tuple[int, ...]  # placement[vCPU index] = host CPU
    nodes: tuple[GuestNode, ...]  # empty: one unbound RAM block, no -numa
    mems: CpuSet  # host nodes of the vCPUs: the instance cgroup's cpuset.mems
    device_nodes: tuple[int | None, ...] = ()  # guest node of each spec device (None: none)
    warnings: tuple[str, ...] = ()

    @property
    def bound(self) -> bool:
        return bool(self.nodes)


def choose(host: Host, pod: CpuSet, count: int) -> CpuSet:
    """`count` of the pod's CPUs (all when equal): the node holding most of them first, whole
    cores before broken ones."""
    if count >= len(pod):
        return pod
    order: list[int] = []
    nodes = sorted(host.nodes_of(pod), key=lambda n: (-len(pod & host.cpus_of_node(n)), n))
    for node in nodes:
        cores = _cores(host, pod & host.cpus_of_node(node))
        cores.sort(key=lambda core: (host.cpus[core[0]].siblings - pod != frozenset(), core[0]))
        for core in cores:
            order.extend(core)
    return frozenset(order[:count])


def _cores(host: Host, chosen: Iterable[int]) -> list[tuple[int, ...]]:
    """The chosen CPUs grouped by host core, each group ascending, groups by first CPU."""
    groups: dict[CpuSet, list[int]] = {}
    for c in sorted(chosen):
        groups.setdefault(host.cpus[c].siblings, []).append(c)
    return sorted((tuple(g) for g in groups.values()), key=lambda g: g[0])


def split_memory(memory_mib: int, weights: Sequence[int], page_mib: int) -> list[int]:
    """`memory_mib` in whole pages, in proportion to `weights`; the remainder goes to the
    first nodes."""
    if memory_mib % page_mib:
        raise PlacementError(f"{memory_mib} MiB is not a whole number of {page_mib} MiB pages")
    pages, total = memory_mib // page_mib, sum(weights)
    shares = [pages * w // total for w in weights]
    for i in range(pages - sum(shares)):
        shares[i % len(shares)] += 1
    if 0 in shares:
        raise PlacementError(
            f"{memory_mib} MiB cannot be split over {len(weights)} NUMA nodes "
            f"in {page_mib} MiB pages"
        )
    return [s * page_mib for s in shares]


def check_devices(host: Host, addresses: Sequence[str]) -> list[PciDevice]:
    """Each device must exist, be bound to vfio-pci, and share its IOMMU group only with
    devices that are too (or have no driver, or are bridges): VFIO takes whole groups."""
    found = []
    for address in addresses:
        dev = host.devices.get(address)
        if dev is None:
            raise PlacementError(f"device {address}: no such PCI device on this host")
        if dev.iommu_group is None:
            raise PlacementError(
                f"device {address} has no IOMMU group: the host runs without an IOMMU "
                "(intel_iommu=on or amd_iommu=on on its kernel command line)"
            )
        if dev.driver != VFIO_DRIVER:
            raise PlacementError(
                f"device {address} is bound to {dev.driver or 'no driver'}, not {VFIO_DRIVER}"
            )
        for other in host.group(dev.iommu_group):
            bridge = other.pci_class is not None and other.pci_class >> 8 == PCI_BRIDGE_CLASS
            if other.driver not in HARMLESS_DRIVERS and not bridge:
                raise PlacementError(
                    f"device {address}: IOMMU group {dev.iommu_group} also holds "
                    f"{other.address} (bound to {other.driver}); every device of the group "
                    f"must be bound to {VFIO_DRIVER}"
                )
        found.append(dev)
    return found


def place(
    host: Host,
    pod: CpuSet,
    vcpus: int,
    memory_mib: int,
    *,
    mode: Literal["auto", "flat"] = "auto",
    numa: Literal["strict", "prefer"] = "prefer",
    hugepages: str = "none",
    devices: Sequence[PciDevice] = (),
) -> Layout:
    missing = pod - host.online
    if missing:
        raise PlacementError(f"CPUs {cpus.format(missing)} are not online on this host")
    chosen = choose(host, pod, vcpus)
    nodes = sorted(host.nodes_of(chosen))
    cores = [core for n in nodes for core in _cores(host, chosen & host.cpus_of_node(n))]
    broken = [c for core in cores for c in core if host.cpus[c].siblings - chosen]
    problems = []
    if mode == "auto":
        if len(nodes) > 1:
            spread = "; ".join(
                f"node {n}: {cpus.format(chosen & host.cpus_of_node(n))}" for n in nodes
            )
            problems.append(f"CPUs {cpus.format(chosen)} span NUMA nodes ({spread})")
        if broken:
            partners = frozenset().union(*(host.cpus[c].siblings for c in broken)) - chosen
            problems.append(
                f"CPUs {cpus.format(broken)} are part of cores whose other hyperthreads "
                f"({cpus.format(partners)}) are not the VM's: the guest gets one thread "
                "per core"
            )
    for dev in devices:
        if dev.node is not None and dev.node not in nodes:
            problems.append(
                f"device {dev.address} is on NUMA node {dev.node}, the vCPUs on "
                f"{cpus.format(nodes)}"
            )
    if numa == "strict" and problems:
        raise PlacementError("numa strict: " + "; ".join(problems))
    mems = host.mems_of(chosen)
    if mode == "flat":
        ordered = tuple(sorted(chosen))
        return Layout(1, vcpus, 1, ordered, (), mems, (None,) * len(devices), tuple(problems))

    sizes = {len(core) for core in cores}
    threads = sizes.pop() if not broken and len(sizes) == 1 else 1
    placement = tuple(c for core in cores for c in core)
    per_node = [len(chosen & host.cpus_of_node(n)) for n in nodes]
    # Equal shares: a socket per node. Otherwise one socket split into nodes, as AMD hosts
    # with several nodes per socket are.
    sockets = len(nodes) if len(set(per_node)) == 1 else 1
    memory = split_memory(memory_mib, per_node, PAGE_MIB[hugepages])
    # A host with one memory node has nowhere else to put RAM: binding it would only add
    # ways to fail (a kernel or QEMU without NUMA support).
    single = len({host.memory_node(n) for n in host.nodes}) == 1
    guest_nodes, first = [], 0
    for n, count, mib in zip(nodes, per_node, memory, strict=True):
        home = None if single else host.memory_node(n)
        guest_nodes.append(GuestNode(tuple(range(first, first + count)), mib, home))
        first += count
    device_nodes = tuple(nodes.index(d.node) if d.node in nodes else None for d in devices)
    if any(g is not None and g >= MAX_DEVICE_NODES for g in device_nodes):
        raise PlacementError(
            f"devices on guest NUMA node {MAX_DEVICE_NODES} or above are not supported"
        )
    return Layout(
        sockets=sockets,
        cores=vcpus // threads // sockets,
        threads=threads,
        placement=placement,
        nodes=tuple(guest_nodes),
        mems=mems,
        device_nodes=device_nodes,
        warnings=tuple(problems),
    )
