from __future__ import annotations

import pytest

from runner import kube, plan, spec
from runner.qemu import Wiring, qemu_argv

UID = "0a1b2c3d-1111-2222-3333-444455556666"
POD = kube.parse_pod_cgroup(f"/kubepods/pod{UID}/{'c' * 64}")
ONLINE = frozenset(range(8))


def mkspec(vcpus: int, **kw: object) -> spec.InstanceSpec:
    return spec.InstanceSpec(name="vm", vcpus=vcpus, memory_mib=64, **kw)  # type: ignore[arg-type]


def state(default: str) -> kube.KubeletState:
    return kube.parse_cpu_manager_state(
        f'{{"policyName":"static","defaultCpuSet":"{default}","checksum":0}}'
    )


def test_float_follows_kubelet_and_vcpus_take_cpus_in_order() -> None:
    p = plan.make_plan(mkspec(3), POD, frozenset({6, 2, 4}), state("0-1,3,5,7"), ONLINE)
    assert p.instance_cpus == (2, 4, 6)
    assert p.placement == (2, 4, 6)
    assert p.float_cpus == {0, 1, 3, 5, 7}
    assert p.instance_name == f"instance-{UID}"


def test_without_kubelet_state_float_is_what_no_instance_holds() -> None:
    p = plan.make_plan(mkspec(2), POD, frozenset({2, 3}), None, ONLINE, frozenset({6}))
    assert p.float_cpus == {0, 1, 4, 5, 7}


def test_policy_none_falls_back_to_online() -> None:
    none = kube.parse_cpu_manager_state('{"policyName":"none","defaultCpuSet":"","checksum":0}')
    p = plan.make_plan(mkspec(1), POD, frozenset({5}), none, ONLINE)
    assert p.float_cpus == ONLINE - {5}


@pytest.mark.parametrize(
    ("vcpus", "pod_cpus", "kubelet", "message"),
    [
        (3, {1, 2}, None, "asks for 3 vCPUs but the pod has 2 dedicated CPUs"),
        (1, {1, 2}, None, "must be equal"),
        (2, {0, 1, 2, 3, 4, 5, 6, 7}, None, "no shared CPUs are left"),
        (2, {0, 1}, "0-7", "are shared CPUs"),
        (1, set(), None, "has no CPUs"),
    ],
)
def test_refusals(vcpus: int, pod_cpus: set[int], kubelet: str | None, message: str) -> None:
    with pytest.raises(plan.PlanError, match=message):
        plan.make_plan(
            mkspec(vcpus), POD, frozenset(pod_cpus), state(kubelet) if kubelet else None, ONLINE
        )


def test_spare_cpus_when_allowed() -> None:
    p = plan.make_plan(mkspec(1), POD, frozenset({3, 4}), None, ONLINE, allow_spare_cpus=True)
    assert p.placement == (3,)
    assert p.instance_cpus == (3, 4)


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


def test_float_never_covers_another_instance_even_if_kubelet_lags() -> None:
    p = plan.make_plan(mkspec(1), POD, frozenset({2}), state("0-1,3-7"), ONLINE, frozenset({3}))
    assert p.float_cpus == {0, 1, 4, 5, 6, 7}
