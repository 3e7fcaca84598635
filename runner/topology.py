"""The host as sysfs describes it: CPU -> core, package, NUMA node and siblings; node distances;
PCI device -> NUMA node, IOMMU group and driver.

Reading and understanding are apart: `record` copies the few sysfs files that matter into a
`Snapshot` (a plain dict, also the format of the test fixtures and of `instance-runner
topology --record`), `parse` turns a snapshot into a `Host`. Only `record` touches the system.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from runner import cpus
from runner.cpus import CpuSet

# Snapshot keys are paths below the sysfs mount; symlinks are recorded as "-> <target name>".
Snapshot = dict[str, str]
LINK = "-> "

_CPU = re.compile(
    r"^devices/system/cpu/cpu(\d+)/topology/(core_id|physical_package_id|"
    r"thread_siblings_list)$"
)
_NODE = re.compile(r"^devices/system/node/node(\d+)/(cpulist|distance)$")
_PCI = re.compile(
    r"^bus/pci/devices/([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])/"
    r"(numa_node|iommu_group|driver|class)$"
)
PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class TopologyError(ValueError):
    """sysfs that does not describe a usable host."""


@attrs.frozen
class Cpu:
    id: int
    package: int
    core: int  # core_id: unique within its package only
    node: int
    siblings: CpuSet  # the hyperthreads of its core, itself included


@attrs.frozen
class PciDevice:
    address: str
    node: int | None  # None: the firmware does not say (numa_node -1)
    iommu_group: int | None  # None: no IOMMU
    driver: str | None
    pci_class: int | None = None  # 0x060400 for a PCI bridge


@attrs.frozen
class Host:
    cpus: Mapping[int, Cpu]
    distances: Mapping[int, tuple[int, ...]]  # node -> its row of the distance table
    devices: Mapping[str, PciDevice] = attrs.field(factory=dict)
    # Nodes with memory (has_memory); None: not said, every node has some. A node of CPUs
    # without memory (some SNC/NPS set-ups, cloud VMs) can be neither bound to nor in mems.
    with_memory: CpuSet | None = None

    @property
    def online(self) -> CpuSet:
        return frozenset(self.cpus)

    @property
    def nodes(self) -> CpuSet:
        return frozenset(c.node for c in self.cpus.values())

    @property
    def smt(self) -> bool:
        return any(len(c.siblings) > 1 for c in self.cpus.values())

    def nodes_of(self, cpu_set: Iterable[int]) -> CpuSet:
        """The NUMA nodes these CPUs sit on."""
        return frozenset(self.cpus[c].node for c in cpu_set if c in self.cpus)

    def memory_node(self, node: int) -> int:
        """Where memory local to `node` lives: itself, or for a node without memory the
        nearest node with some (by distance, then number)."""
        if self.with_memory is None or node in self.with_memory or not self.with_memory:
            return node
        row = self.distances.get(node, ())
        return min(self.with_memory, key=lambda m: (row[m] if m < len(row) else 255, m))

    def mems_of(self, cpu_set: Iterable[int]) -> CpuSet:
        """The memory nodes local to these CPUs: what an instance cgroup's cpuset.mems must
        be (the runner's and the controller's one rule)."""
        return frozenset(self.memory_node(n) for n in self.nodes_of(cpu_set))

    def cpus_of_node(self, node: int) -> CpuSet:
        return frozenset(c.id for c in self.cpus.values() if c.node == node)

    def group(self, number: int) -> tuple[PciDevice, ...]:
        """Every device in an IOMMU group, by address."""
        return tuple(d for _a, d in sorted(self.devices.items()) if d.iommu_group == number)


def parse(snap: Mapping[str, str]) -> Host:
    """A `Host` from a snapshot. CPUs are the online ones; a kernel without NUMA (no node
    directories) puts them all on node 0."""
    try:
        return _parse(snap)
    except (ValueError, IndexError) as e:
        if isinstance(e, TopologyError):
            raise
        raise TopologyError(f"unreadable sysfs topology: {e}") from None


def _parse(snap: Mapping[str, str]) -> Host:
    try:
        online = cpus.parse(snap["devices/system/cpu/online"])
    except KeyError:
        raise TopologyError("no devices/system/cpu/online: not a sysfs") from None
    fields: dict[int, dict[str, str]] = {}
    nodes: dict[int, dict[str, str]] = {}
    pci: dict[str, dict[str, str]] = {}
    for key, value in snap.items():
        if m := _CPU.match(key):
            fields.setdefault(int(m[1]), {})[m[2]] = value.strip()
        elif m := _NODE.match(key):
            nodes.setdefault(int(m[1]), {})[m[2]] = value.strip()
        elif m := _PCI.match(key):
            pci.setdefault(m[1], {})[m[2]] = value.strip()
    node_of: dict[int, int] = {}
    for n, f in nodes.items():
        for c in cpus.parse(f.get("cpulist", "")):
            node_of[c] = n
    table: dict[int, Cpu] = {}
    for c in sorted(online):
        f = fields.get(c, {})
        try:
            table[c] = Cpu(
                id=c,
                package=int(f.get("physical_package_id", "0")),
                core=int(f.get("core_id", str(c))),
                node=node_of.get(c, 0),
                siblings=cpus.parse(f.get("thread_siblings_list", str(c))) & online,
            )
        except ValueError as e:
            raise TopologyError(f"CPU {c}: unreadable topology: {e}") from None
    distances = {
        n: tuple(int(x) for x in f.get("distance", "").split()) for n, f in sorted(nodes.items())
    }
    devices = {
        a: PciDevice(
            address=a,
            node=_node(f.get("numa_node")),
            iommu_group=int(f["iommu_group"].removeprefix(LINK)) if "iommu_group" in f else None,
            driver=f["driver"].removeprefix(LINK) if "driver" in f else None,
            pci_class=_class(f.get("class")),
        )
        for a, f in sorted(pci.items())
    }
    memory = snap.get("devices/system/node/has_memory")
    return Host(table, distances, devices, cpus.parse(memory) if memory is not None else None)


def _node(text: str | None) -> int | None:
    """A device's numa_node; -1 (firmware does not say) or anything odd is None: one strange
    device must not stop the host from being read."""
    try:
        node = int(text or "-1")
    except ValueError:
        return None
    return node if node >= 0 else None


def _class(text: str | None) -> int | None:
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def record(sysfs: str | Path = "/sys") -> Snapshot:
    """The files `parse` reads, copied from a sysfs mount."""
    root = Path(sysfs)
    snap: Snapshot = {}

    def take(path: Path) -> None:
        key = str(path.relative_to(root))
        try:
            if path.is_symlink():
                snap[key] = LINK + os.path.basename(os.readlink(path))
            else:
                snap[key] = path.read_text().strip()
        except OSError:
            pass  # gone, or unreadable in this container: parse has defaults

    take(root / "devices/system/cpu/online")
    for cpu in sorted(root.glob("devices/system/cpu/cpu[0-9]*")):
        for name in ("core_id", "physical_package_id", "thread_siblings_list"):
            take(cpu / "topology" / name)
    take(root / "devices/system/node/has_memory")
    for node in sorted(root.glob("devices/system/node/node[0-9]*")):
        take(node / "cpulist")
        take(node / "distance")
    for dev in sorted(root.glob("bus/pci/devices/*")):
        for name in ("numa_node", "iommu_group", "driver", "class"):
            if (dev / name).exists() or (dev / name).is_symlink():
                take(dev / name)
    if "devices/system/cpu/online" not in snap:
        raise TopologyError(f"{root} has no devices/system/cpu/online: not a sysfs mount")
    return snap


def read_host(sysfs: str | Path = "/sys") -> Host:
    return parse(record(sysfs))
