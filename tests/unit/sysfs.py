"""sysfs snapshots (the format `topology.record` writes) of the hosts the planner must handle,
numbered as the kernel numbers real ones. Recorded ones live in fixtures/sysfs/."""

from __future__ import annotations

import json
from pathlib import Path

from runner import cpus

RECORDED = Path(__file__).parent / "fixtures" / "sysfs"


def recorded(name: str) -> dict[str, str]:
    return json.loads((RECORDED / f"{name}.json").read_text())


def host(
    packages: int,
    cores: int,
    threads: int,
    nodes_per_package: int = 1,
    numbering: str = "interleaved",
    offline: frozenset[int] = frozenset(),
    devices: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """`cores` per package. interleaved: CPU n and n + (all cores) are siblings (Xeon, EPYC);
    adjacent: 2k and 2k+1 are (some desktops, many VMs). `offline`: holes in the CPU list."""
    total = packages * cores
    snap: dict[str, str] = {}
    core_cpus: list[list[int]] = []
    for g in range(total):  # global core index
        if numbering == "interleaved":
            core_cpus.append([g + t * total for t in range(threads)])
        else:
            core_cpus.append([g * threads + t for t in range(threads)])
    all_cpus = {c for core in core_cpus for c in core}
    online = frozenset(all_cpus) - offline
    snap["devices/system/cpu/online"] = cpus.format(online)
    per_node = cores // nodes_per_package
    node_cpus: dict[int, set[int]] = {}
    for g, members in enumerate(core_cpus):
        package, local = divmod(g, cores)
        node = package * nodes_per_package + local // per_node
        for c in members:
            if c not in online:
                continue
            base = f"devices/system/cpu/cpu{c}/topology"
            snap[f"{base}/core_id"] = str(local)
            snap[f"{base}/physical_package_id"] = str(package)
            snap[f"{base}/thread_siblings_list"] = cpus.format(set(members) & online)
            node_cpus.setdefault(node, set()).add(c)
    count = packages * nodes_per_package
    for n in range(count):
        row = [
            10 if m == n else 12 if m // nodes_per_package == n // nodes_per_package else 32
            for m in range(count)
        ]
        snap[f"devices/system/node/node{n}/cpulist"] = cpus.format(node_cpus.get(n, set()))
        snap[f"devices/system/node/node{n}/distance"] = " ".join(map(str, row))
    for address, files in (devices or {}).items():
        for name, value in files.items():
            snap[f"bus/pci/devices/{address}/{name}"] = value
    return snap


def gpu(node: int, group: int, driver: str = "vfio-pci") -> dict[str, str]:
    return {
        "numa_node": str(node),
        "iommu_group": f"-> {group}",
        "driver": f"-> {driver}",
        "class": "0x030200",
    }
