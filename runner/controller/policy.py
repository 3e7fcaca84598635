"""Who may register what: the controller's one registration rule. Pure: everything it
weighs is passed in, read by the handlers; the verdict is an RPC error or the CPUs granted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from runner import cpus, kube, plan, rpc
from runner.cpus import CpuSet
from runner.kube import KubeletState, PodCgroup
from runner.node.kubelet import Unknown
from runner.plan import Placed


def refuse(code: int, message: str) -> rpc.RPCError:
    return rpc.RPCError(code, message)


def check_caller(caller: PodCgroup | None, uuid: str, hidden: bool = False) -> None:
    """The uuid must be a pod UID, and the caller's own pod. `hidden`: the caller's process
    is not in the controller's PID namespace, so who it is cannot be known at all."""
    if kube.normalise_uid(uuid) != uuid:
        raise refuse(rpc.INVALID_PARAMS, f"invalid params: uuid {uuid!r} is not a pod UID")
    if hidden:
        raise refuse(
            rpc.FORBIDDEN,
            "the caller's process is not visible in the controller's PID namespace "
            "(the controller's pod needs hostPID: true)",
        )
    if caller is None:
        raise refuse(
            rpc.FORBIDDEN,
            "the caller is not in a pod's container cgroup "
            "(register before leaving it, deregister after returning)",
        )
    if caller.pod_uid != uuid:
        raise refuse(rpc.FORBIDDEN, f"pod {caller.pod_uid} may not act for pod {uuid}")


def may_register(
    caller: PodCgroup | None,
    uuid: str,
    cpuset: str,
    container_cpus: CpuSet | None,
    online: CpuSet,
    state: KubeletState | Unknown,
    hidden: bool = False,
    possible: CpuSet | None = None,
) -> CpuSet:
    """The CPUs this caller may have as its instance cgroup, or the refusal. `container_cpus`
    is the caller's container cgroup's cpuset (None once that cgroup is gone). The list is
    parsed within the node's `possible` CPUs (default: `online`), never expanded beyond them.
    A kubelet state that cannot be read grants nothing: only kubelet hands out exclusive
    CPUs, and while its word is unknown the caller is told to come back (BUSY)."""
    check_caller(caller, uuid, hidden)
    bound = max(possible or online or {0}) + 1
    try:
        wanted = cpus.parse(cpuset, bound)
    except cpus.CpuListError as e:
        raise refuse(rpc.INVALID_PARAMS, f"invalid params: {e}") from None
    if not wanted:
        raise refuse(rpc.INVALID_PARAMS, "invalid params: cpuset is empty")
    if wanted - online:
        raise refuse(rpc.FORBIDDEN, f"CPUs {cpus.format(wanted - online)} are not on this node")
    if container_cpus is None:
        raise refuse(rpc.FORBIDDEN, "the caller's container cgroup is gone")
    if wanted != container_cpus:
        raise refuse(
            rpc.FORBIDDEN,
            f"cpuset {cpus.format(wanted)} is not the pod's ({cpus.format(container_cpus)})",
        )
    if isinstance(state, Unknown):
        raise refuse(rpc.BUSY, f"kubelet's CPU manager state is unknown: {state.reason}")
    if isinstance(state, KubeletState):
        try:
            kube.check_static(state)
        except kube.KubeError as e:
            raise refuse(rpc.FORBIDDEN, str(e)) from None
        # The caller's own container entry, not the union over the pod: a sidecar has its
        # own, and an init container's entry stays until the pod goes. Only kubelet hands
        # out exclusive CPUs: no entry, no claim.
        own = state.container_with(uuid, wanted)
        if own is None:
            listed = state.entries.get(uuid, {})
            held = ", ".join(f"{n} {cpus.format(c)}" for n, c in sorted(listed.items()))
            raise refuse(
                rpc.FORBIDDEN,
                f"cpuset {cpus.format(wanted)} is no container's exclusive allocation "
                f"in pod {uuid} ({held or 'none listed'})",
            )
        if state.default_cpus & wanted:
            raise refuse(
                rpc.FORBIDDEN,
                f"CPUs {cpus.format(state.default_cpus & wanted)} are kubelet's shared CPUs",
            )
    return wanted


def may_take(uuid: str, wanted: CpuSet, live: Mapping[str, CpuSet]) -> bool:
    """Against the instances live now: True if `uuid` already holds exactly `wanted`
    (registration is idempotent), False if it may create it; otherwise the conflict."""
    mine = live.get(uuid)
    if mine is not None:
        if mine != wanted:
            raise refuse(rpc.CONFLICT, f"instance {uuid} is live with cpuset {cpus.format(mine)}")
        return True
    clash = sorted(u for u, held in live.items() if held & wanted)
    if clash:
        raise refuse(rpc.CONFLICT, "CPUs already held by instance(s) " + ", ".join(clash))
    return False


def check_tenant(
    uuid: str, caller_ns: int | None, tenants: Mapping[str, int], own_ns: int, hidden: bool = False
) -> int:
    """Who may move threads for `uuid`: a process of the PID namespace that registered it (the
    runner's container; kubectl exec joins it too). It is the tenant's mark once the runner
    has left its container cgroup. A pod in the node's own PID namespace (hostPID) cannot be
    told from any other process, and is refused. Returns the tenant's namespace."""
    if kube.normalise_uid(uuid) != uuid:
        raise refuse(rpc.INVALID_PARAMS, f"invalid params: uuid {uuid!r} is not a pod UID")
    if hidden or caller_ns is None:
        raise refuse(rpc.FORBIDDEN, "the caller's PID namespace cannot be known")
    ns = tenants.get(uuid)
    if ns is None:
        raise refuse(rpc.FORBIDDEN, f"pod {uuid} has not registered an instance")
    if ns != caller_ns:
        raise refuse(rpc.FORBIDDEN, f"the caller is not of pod {uuid}'s PID namespace")
    if ns == own_ns:
        raise refuse(
            rpc.FORBIDDEN,
            f"pod {uuid} shares the node's PID namespace (hostPID): its processes cannot be "
            "told from anyone else's",
        )
    return ns


@attrs.frozen
class Realtime:
    """What the node allows of SCHED_FIFO: the controller's cap on the priority, and the
    kernel's RT throttling as the controller read it (None: unreadable)."""

    max_priority: int = 1
    throttling: tuple[int, int] | None = None  # sched_rt_runtime_us, sched_rt_period_us


def check_placement(
    vcpus: Sequence[Placed], instance: CpuSet, realtime: Realtime = Realtime()
) -> None:
    """Each vCPU on a CPU of its own instance cgroup, each CPU, vCPU and thread once, with a
    FIFO priority in 0 to the node's cap (0: not realtime), and FIFO only where the kernel's
    RT throttling leaves the CPU's kernel threads some time. The pod asks; the node decides."""
    if not vcpus:
        raise refuse(rpc.INVALID_PARAMS, "invalid params: no vCPUs")
    seen_cpus: set[int] = set()
    seen_vcpus: set[int] = set()
    seen_tids: set[int] = set()
    for p in vcpus:
        if p.tid <= 0 or p.vcpu < 0:
            raise refuse(rpc.INVALID_PARAMS, f"invalid params: vCPU {p.vcpu} thread {p.tid}")
        if not 0 <= p.priority <= 99:
            raise refuse(rpc.INVALID_PARAMS, f"invalid params: priority {p.priority} not in 0-99")
        if p.priority > realtime.max_priority:
            raise refuse(
                rpc.FORBIDDEN,
                f"SCHED_FIFO priority {p.priority} is above this node's cap "
                f"({realtime.max_priority}, the controller's --max-rt-priority)",
            )
        if p.cpu not in instance:
            raise refuse(
                rpc.FORBIDDEN,
                f"CPU {p.cpu} is not the instance's ({cpus.format(instance) or 'none'})",
            )
        if p.cpu in seen_cpus or p.vcpu in seen_vcpus or p.tid in seen_tids:
            raise refuse(
                rpc.INVALID_PARAMS,
                f"invalid params: vCPU {p.vcpu}, CPU {p.cpu} or thread {p.tid} twice",
            )
        seen_cpus.add(p.cpu)
        seen_vcpus.add(p.vcpu)
        seen_tids.add(p.tid)
    if any(p.priority for p in vcpus):
        if realtime.throttling is None:
            raise refuse(rpc.FORBIDDEN, "realtime vCPUs refused: RT throttling cannot be read")
        try:
            plan.check_realtime(True, *realtime.throttling)
        except plan.PlanError as e:
            raise refuse(rpc.FORBIDDEN, str(e)) from None


def check_node(on_node: bool, what: str) -> None:
    """Node-wide answers (every pod's UID, CPUs, threads) are for the node alone: a root
    process outside every pod. A pod learns about itself."""
    if not on_node:
        raise refuse(
            rpc.FORBIDDEN, f"{what} is for the node itself (a root process outside every pod)"
        )


def check_pid(pid: int) -> None:
    if pid <= 0:
        raise refuse(rpc.INVALID_PARAMS, f"invalid params: pid {pid}")
