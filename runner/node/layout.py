"""What lives under the node's cgroup root: `float` and one `instance-<pod uid>` per VM pod,
and the one rule for which instance cgroups are stale. The rule is pure; `Layout` reads.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import attrs

from runner import cpus
from runner.cpus import CpuSet
from runner.kube import KubeletState, cpu_weight
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.node.kubelet import Unknown

FLOAT = "float"
INSTANCE_PREFIX = "instance-"
POD_FLOAT_PREFIX = "pod-"  # float/pod-<uid>: one pod's part of float (podfloat.py)


@attrs.frozen
class Instance:
    uuid: str
    path: str
    cpus: CpuSet
    threads: int


def stale(
    instances: Mapping[str, Instance],
    state: KubeletState | Unknown,
    young: Collection[str] = (),
) -> list[Instance]:
    """Instance cgroups whose runner is gone for good: no thread left and the pod gone from
    cpu_manager_state. A SIGKILLed runner leaves exactly this behind, and until it is removed
    its CPUs stay out of float. Nothing is stale while the state is unknown, and a `young`
    one (just registered, not yet pinned) is not either."""
    if isinstance(state, Unknown):
        return []
    return [
        inst
        for uuid, inst in sorted(instances.items())
        if not inst.threads and uuid not in state.entries and uuid not in young
    ]


DEFAULT_WEIGHT = 100  # what any cgroup has unless told otherwise


def root_weight(held: CpuSet) -> int:
    """`<root>`'s cpu.weight: what kubelet would give the VM pods' own cgroups together
    (each Guaranteed VM pod requests its dedicated CPUs), so that their helpers in float get
    the pods' share against kubepods when the shared CPUs are busy. Never below the default
    a cgroup has: a node with few VM CPUs keeps it."""
    return max(DEFAULT_WEIGHT, cpu_weight(1000 * len(held)))


def held_cpus(instances: Mapping[str, Instance]) -> CpuSet:
    return frozenset().union(*(i.cpus for i in instances.values()))


def online_cpus() -> CpuSet:
    return cpus.parse(Path("/sys/devices/system/cpu/online").read_text())


def possible_cpus() -> CpuSet:
    """Every CPU this node could ever bring online: the bound on a CPU list in a request."""
    return cpus.parse(Path("/sys/devices/system/cpu/possible").read_text())


class Layout:
    """The root's names and a listing of its instance cgroups."""

    def __init__(self, cg: CgroupFS, root: str) -> None:
        self.cg = cg
        self.root = root
        self.float = f"{root}/{FLOAT}"

    def instance(self, uuid: str) -> str:
        return f"{self.root}/{INSTANCE_PREFIX}{uuid}"

    def float_of(self, uuid: str) -> str:
        """The pod's part of float, where everything of it on the shared CPUs runs."""
        return f"{self.float}/{POD_FLOAT_PREFIX}{uuid}"

    def pod_floats(self) -> dict[str, str]:
        """uuid -> the path of each pod's part of float."""
        if not self.cg.exists(self.float):
            return {}
        try:
            children = self.cg.children(self.float)
        except CgroupError:
            return {}
        return {
            name.removeprefix(POD_FLOAT_PREFIX): path
            for path in children
            if (name := path.rsplit("/", 1)[1]).startswith(POD_FLOAT_PREFIX)
        }

    def instances(self) -> dict[str, Instance]:
        if not self.cg.exists(self.root):
            return {}
        found = {}
        for path in self.cg.children(self.root):
            name = path.rsplit("/", 1)[1]
            if not name.startswith(INSTANCE_PREFIX):
                continue
            uuid = name.removeprefix(INSTANCE_PREFIX)
            try:
                found[uuid] = Instance(
                    uuid, path, self.cg.cpus(path, effective=False), len(self.cg.threads(path))
                )
            except (CgroupError, cpus.CpuListError):
                continue  # removed under us
        return found

    def float_cpus(self) -> CpuSet | None:
        """float's own cpuset.cpus; None while there is no float."""
        if not self.cg.exists(self.float):
            return None
        return self.cg.cpus(self.float, effective=False)
