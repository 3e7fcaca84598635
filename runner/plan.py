"""Everything decided before acting: which CPUs float and the instance get, which vCPU runs
where. Pure: inputs are what was read from the system, output is a Plan or a PlanError."""

from __future__ import annotations

import attrs

from runner import cpus
from runner.cpus import CpuSet
from runner.kube import KubeletState, PodCgroup
from runner.spec import InstanceSpec


class PlanError(ValueError):
    """The pod cannot run this instance as asked; nothing has been touched."""


@attrs.frozen
class Plan:
    pod: PodCgroup
    instance_cpus: tuple[int, ...]  # ascending
    float_cpus: CpuSet
    placement: tuple[int, ...]  # placement[vcpu index] = host CPU

    @property
    def instance_name(self) -> str:
        return f"instance-{self.pod.pod_uid}"


def shared_cpus(
    kubelet: KubeletState | None, online: CpuSet, instance: CpuSet, other_instances: CpuSet
) -> CpuSet:
    """float's CPUs: kubelet's defaultCpuSet when it has one (policy "none" writes ""), else
    every online CPU that no instance holds."""
    if kubelet is not None and kubelet.default_cpus:
        # kubelet's pool, less what another instance still holds (its state can lag).
        return kubelet.default_cpus - other_instances
    return online - instance - other_instances


def make_plan(
    spec: InstanceSpec,
    pod: PodCgroup,
    container_cpus: CpuSet,
    kubelet: KubeletState | None,
    online: CpuSet,
    other_instances: CpuSet = frozenset(),
    allow_spare_cpus: bool = False,
) -> Plan:
    if not container_cpus:
        raise PlanError(f"the container cgroup {pod.path} has no CPUs")
    floating = shared_cpus(kubelet, online, container_cpus, other_instances)
    overlap = floating & container_cpus
    if overlap:
        raise PlanError(
            f"the pod's CPUs {cpus.format(container_cpus)} are shared CPUs "
            f"(kubelet's defaultCpuSet {cpus.format(floating)}): dedicated vCPUs need a "
            "Guaranteed pod with whole CPUs on a node with the static CPU manager policy"
        )
    if not floating:
        raise PlanError("no shared CPUs are left for the pod's other threads")
    n = len(container_cpus)
    if spec.vcpus > n or (spec.vcpus < n and not allow_spare_cpus):
        raise PlanError(
            f"the spec asks for {spec.vcpus} vCPUs but the pod has {n} dedicated CPUs "
            f"({cpus.format(container_cpus)}); they must be equal"
            + ("" if spec.vcpus > n else " (or allow spare CPUs)")
        )
    ordered = tuple(sorted(container_cpus))
    return Plan(pod, ordered, floating, ordered[: spec.vcpus])
