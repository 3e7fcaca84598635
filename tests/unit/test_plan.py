from __future__ import annotations

import pytest

from runner import kube, plan, spec, topology
from runner.argv import Wiring, qemu_argv

from . import sysfs

UID = "0a1b2c3d-1111-2222-3333-444455556666"
POD = kube.parse_pod_cgroup(f"/kubepods/pod{UID}/{'c' * 64}")
ONLINE = frozenset(range(8))
HOST = topology.parse(sysfs.host(1, 8, 1))  # one node, no SMT: the map is the CPU order


def mkspec(vcpus: int, **kw: object) -> spec.InstanceSpec:
    return spec.InstanceSpec(name="vm", vcpus=vcpus, memory_mib=64, **kw)  # type: ignore[arg-type]


def test_vcpus_take_the_pod_cpus_in_order() -> None:
    p = plan.make_plan(mkspec(3), POD, frozenset({6, 2, 4}), frozenset({0, 1, 3, 5, 7}), HOST)
    assert p.instance_cpus == (2, 4, 6)
    assert p.placement == (2, 4, 6)


def test_controller_mode_leaves_the_shared_check_to_the_controller() -> None:
    p = plan.make_plan(mkspec(2), POD, frozenset({2, 3}), None, HOST)
    assert p.placement == (2, 3)


@pytest.mark.parametrize(
    ("vcpus", "pod_cpus", "shared", "message"),
    [
        (3, {1, 2}, {0}, "asks for 3 vCPUs but the pod has 2 dedicated CPUs"),
        (1, {1, 2}, {0}, "must be equal"),
        (2, {0, 1}, set(), "no shared CPUs are left"),
        (2, {0, 1}, ONLINE, "are shared CPUs"),
        (1, set(), {0}, "has no CPUs"),
    ],
)
def test_refusals(vcpus: int, pod_cpus: set[int], shared: set[int], message: str) -> None:
    with pytest.raises(plan.PlanError, match=message):
        plan.make_plan(mkspec(vcpus), POD, frozenset(pod_cpus), frozenset(shared), HOST)


def test_shared_overlap_is_checked_before_the_rest() -> None:
    with pytest.raises(plan.PlanError, match="are shared CPUs"):
        plan.make_plan(mkspec(2), POD, frozenset({0, 1}), frozenset({1, 2}), HOST)


def test_spare_cpus_when_allowed() -> None:
    p = plan.make_plan(
        mkspec(1), POD, frozenset({3, 4}), frozenset({0}), HOST, allow_spare_cpus=True
    )
    assert p.placement == (3,)
    assert p.instance_cpus == (3, 4)


def vcpu(index: int, tid: int) -> dict[str, object]:
    return {"cpu-index": index, "thread-id": tid, "props": {}, "qom-path": "", "target": "x86_64"}


def test_vcpus_matched_by_index_whatever_order_qemu_answers_in() -> None:
    placed = plan.match_vcpus([vcpu(1, 101), vcpu(0, 100)], (5, 7))
    assert placed == [plan.Placed(0, 100, 5), plan.Placed(1, 101, 7)]


def test_realtime_vcpus_carry_their_priority() -> None:
    placed = plan.match_vcpus([vcpu(0, 100), vcpu(1, 101)], (5, 7), {1: 3})
    assert placed == [plan.Placed(0, 100, 5, 0), plan.Placed(1, 101, 7, 3)]
    normal, fifo = placed
    other, fifo_policy = 0, plan.SCHED_FIFO
    assert plan.sched_as_planned(normal, other, 0)
    assert plan.sched_as_planned(normal, fifo_policy, 50)  # not ours to decide
    assert plan.sched_as_planned(fifo, fifo_policy, 3)
    assert not plan.sched_as_planned(fifo, fifo_policy, 2)  # chrt behind our back
    assert not plan.sched_as_planned(fifo, other, 0)
    assert not plan.sched_as_planned(fifo, 2, 3)  # SCHED_RR is not what was asked


@pytest.mark.parametrize(
    ("isolated", "runtime", "message"),
    [
        (False, 950000, "need dedicated CPUs"),
        (True, -1, "RT throttling is off"),
        (True, 0, "gives realtime threads no time"),
    ],
)
def test_realtime_is_refused_where_unsafe(isolated: bool, runtime: int, message: str) -> None:
    with pytest.raises(plan.PlanError, match=message) as e:
        plan.check_realtime(isolated, runtime, 1000000)
    assert "\n" not in str(e.value)


def test_realtime_with_throttling_on_dedicated_cpus_is_allowed() -> None:
    plan.check_realtime(True, 950000, 1000000)
    plan.check_realtime(True, 1, 1000000)


def test_two_vcpus_on_one_thread_are_refused() -> None:
    # TCG with thread=single: pinning would flip the one thread between two CPUs for ever.
    with pytest.raises(plan.PlanError, match="several vCPUs on one thread"):
        plan.match_vcpus([vcpu(0, 100), vcpu(1, 100)], (5, 7))


def test_vcpu_count_must_match() -> None:
    with pytest.raises(plan.PlanError, match="QEMU reports 1 vCPUs"):
        plan.match_vcpus([vcpu(0, 100)], (5, 7))


def test_qemu_argv_firmware_only_tcg() -> None:
    argv = qemu_argv(mkspec(2, memory=spec.Memory(prealloc=False)), "tcg", Wiring(qmp_fd=7))
    assert argv[:2] == ["qemu-system-x86_64", "-S"]
    joined = " ".join(argv)
    assert "-accel tcg,thread=multi" in joined
    assert "-smp 2 -m 64M" in joined
    assert "-chardev socket,id=qmp,fd=7 -mon chardev=qmp,mode=control" in joined
    assert "-name vm,debug-threads=on" in joined
    assert "-kernel" not in argv


def test_qemu_argv_kernel_kvm_extra() -> None:
    s = mkspec(1, kernel="/k", initrd="/i", cmdline="a b", extra_args=("-serial", "stdio"))
    argv = qemu_argv(s, "kvm", Wiring(qmp_fd=3))
    assert argv[argv.index("-kernel") :] == [
        "-kernel",
        "/k",
        "-initrd",
        "/i",
        "-append",
        "a b",
        "-serial",
        "stdio",
    ]
    assert "-cpu" in argv and argv[argv.index("-cpu") + 1] == "host"


def test_a_vcpu_is_in_place_only_in_the_instance_cgroup_on_its_cpu_alone() -> None:
    inst = "/instances/instance-u"
    assert plan.in_place(inst, {3}, inst, 3)
    assert plan.in_place(inst, frozenset({3}), inst, 3)
    assert not plan.in_place(inst, {3, 4}, inst, 3)  # sharing a CPU it does not own
    assert not plan.in_place("/instances/float", {3}, inst, 3)
    assert not plan.in_place(inst, {3}, inst, None)  # not pinned (isolation off)
