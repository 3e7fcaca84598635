"""Everything decided before acting: which CPUs the instance gets, which vCPU runs where,
which QEMU thread is which vCPU. Pure: inputs are what was read from the system, output is a
Plan or a PlanError."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import attrs

from runner import cpus, placement
from runner.cpus import CpuSet
from runner.kube import PodCgroup
from runner.placement import Layout
from runner.spec import InstanceSpec
from runner.topology import Host


class PlanError(ValueError):
    """The pod cannot run this instance as asked; nothing has been touched."""


@attrs.frozen
class Plan:
    pod: PodCgroup
    instance_cpus: tuple[int, ...]  # ascending
    layout: Layout  # guest topology, vCPU -> host CPU, guest NUMA nodes
    mems: CpuSet  # the instance cgroup's cpuset.mems: memory nodes local to instance_cpus

    @property
    def placement(self) -> tuple[int, ...]:
        """placement[vcpu index] = host CPU"""
        return self.layout.placement


def in_place(
    cgroup: str, allowed: Collection[int], instance_cgroup: str | None, cpu: int | None
) -> bool:
    """The one rule of a placed vCPU: in the instance cgroup, allowed on its own CPU alone.
    Pinning checks it, the keeper re-checks it, /metrics and /readyz report it (inspect
    tells its two halves apart for people)."""
    return cpu is not None and cgroup == instance_cgroup and allowed == {cpu}


SCHED_FIFO = 1  # linux/sched.h, the same on every architecture


@attrs.frozen
class Placed:
    vcpu: int
    tid: int
    cpu: int
    priority: int = 0  # SCHED_FIFO priority of a realtime vCPU; 0: the default policy


def sched_as_planned(p: Placed, policy: int, rt_priority: int) -> bool:
    """A realtime vCPU runs SCHED_FIFO at its priority; the others are left as QEMU made
    them."""
    return not p.priority or (policy == SCHED_FIFO and rt_priority == p.priority)


def check_realtime(isolated: bool, rt_runtime_us: int, rt_period_us: int) -> None:
    """Where a SCHED_FIFO vCPU is safe. Its guest may spin for ever: the CPU must be its
    alone, and the kernel's RT throttling must still leave the CPU's own kernel threads
    (kworkers, ksoftirqd, RCU) some time each period."""
    if not isolated:
        raise PlanError(
            "realtime vCPUs need dedicated CPUs (--isolation on): a SCHED_FIFO vCPU on shared "
            "CPUs would starve every other thread there"
        )
    if rt_runtime_us < 0:
        raise PlanError(
            "realtime vCPUs refused: RT throttling is off (kernel.sched_rt_runtime_us = -1), so "
            "a spinning SCHED_FIFO vCPU would lock its CPU's kernel threads out for ever; set "
            f"it below kernel.sched_rt_period_us ({rt_period_us}), e.g. the default 950000"
        )
    if rt_runtime_us == 0:
        raise PlanError(
            "realtime vCPUs refused: kernel.sched_rt_runtime_us = 0 gives realtime threads no "
            "time at all"
        )


def make_plan(
    spec: InstanceSpec,
    pod: PodCgroup,
    container_cpus: CpuSet,
    shared: CpuSet | None,
    host: Host,
    allow_spare_cpus: bool = False,
) -> Plan:
    """`shared`: the node's shared CPUs (what float is made of), or None when the node
    controller checks them instead of us."""
    if not container_cpus:
        raise PlanError(f"the container cgroup {pod.path} has no CPUs")
    if shared is not None and shared & container_cpus:
        raise PlanError(
            f"the pod's CPUs {cpus.format(container_cpus)} are shared CPUs "
            f"(kubelet's defaultCpuSet {cpus.format(shared)}): dedicated vCPUs need a "
            "Guaranteed pod with whole CPUs on a node with the static CPU manager policy"
        )
    if shared is not None and not shared - container_cpus:
        raise PlanError("no shared CPUs are left for the pod's other threads")
    n = len(container_cpus)
    if spec.vcpus > n or (spec.vcpus < n and not allow_spare_cpus):
        raise PlanError(
            f"the spec asks for {spec.vcpus} vCPUs but the pod has {n} dedicated CPUs "
            f"({cpus.format(container_cpus)}); they must be equal"
            + ("" if spec.vcpus > n else " (or allow spare CPUs)")
        )
    try:
        devices = placement.check_devices(host, [d.address for d in spec.devices])
        layout = placement.place(
            host,
            container_cpus,
            spec.vcpus,
            spec.memory_mib,
            mode=spec.topology,
            numa=spec.numa,
            hugepages=spec.memory.hugepages,
            devices=devices,
        )
    except placement.PlacementError as e:
        raise PlanError(str(e)) from None
    return Plan(pod, tuple(sorted(container_cpus)), layout, host.mems_of(container_cpus))


def describe(layout: Layout) -> str:
    """The guest topology in a few words, for logs: "1 socket x 2 cores x 2 threads, RAM on
    host node 1"."""
    shape = f"{layout.sockets}s x {layout.cores}c x {layout.threads}t"
    if not layout.bound:
        return f"{shape}, RAM unbound"
    homes = ", ".join(f"{n.memory_mib} MiB on host node {n.host_node}" for n in layout.nodes)
    return f"{shape}, {homes}"


def vcpu_threads(found: list[dict[str, Any]]) -> dict[int, int]:
    """QEMU's `query-cpus-fast` answer as vCPU index -> thread id."""
    return {int(v["cpu-index"]): int(v["thread-id"]) for v in found}


def match_vcpus(
    found: list[dict[str, Any]],
    placement: tuple[int, ...],
    realtime: Mapping[int, int] | None = None,
) -> list[Placed]:
    """QEMU's `query-cpus-fast` answer matched to the placement (and the realtime vCPUs'
    priorities), vCPU by vCPU. Each vCPU
    needs a thread of its own: two vCPUs on one thread (TCG without thread=multi) cannot
    each own a CPU, and pinning them would flip the thread between the two for ever."""
    vcpus = sorted(found, key=lambda v: int(v["cpu-index"]))
    if len(vcpus) != len(placement):
        raise PlanError(f"QEMU reports {len(vcpus)} vCPUs, the spec asks for {len(placement)}")
    tids = [int(v["thread-id"]) for v in vcpus]
    if len(set(tids)) != len(tids):
        shared = sorted({t for t in tids if tids.count(t) > 1})
        raise PlanError(
            f"QEMU runs several vCPUs on one thread ({', '.join(map(str, shared))}): "
            "each vCPU needs its own thread (TCG needs thread=multi)"
        )
    priority = realtime or {}
    return [
        Placed(int(v["cpu-index"]), tid, cpu, priority.get(int(v["cpu-index"]), 0))
        for v, tid, cpu in zip(vcpus, tids, placement, strict=True)
    ]
