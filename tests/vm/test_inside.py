"""Boots the test VM and runs tests/vm/inside/<module> there (or several modules, in one
VM), as root on pure cgroup v2."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import REPO, VMRunner

# Each module's test VM options, the kernels it runs on, and its time in seconds measured on a
# 2-core machine with another test VM running beside it (one TCG thread each). The two Debian
# kernel series differ in how affinity survives cpuset changes (6.2+), in partitions (6.7+),
# and in SO_PEERPIDFD (6.5+): every module that places threads, keeps them placed, makes
# partitions or identifies a peer runs on both. The image under podman, the pod simulator's
# formats, metrics and inspect, and the guest topology do not depend on the series: 6.12
# only, which keeps the suite under 50 minutes.
BOTH = ("6.1", "6.12")
MODULES: list[tuple[str, str, list[str], int, tuple[str, ...]]] = [
    ("node-faults", "test_node_faults.py", ["--cpus", "4"], 400, BOTH),
    ("controller", "test_controller.py", ["--cpus", "4"], 500, BOTH),
    # The image under podman and crun: its layers and two containers live in the VM's memory.
    ("container", "test_container.py", ["--cpus", "4", "--memory", "4096"], 490, ("6.12",)),
    # The hostile tenant: one controller, a victim, an attacker and a probe pod, each attack
    # from inside an unprivileged pod.
    ("tenants", "test_tenants.py", ["--cpus", "6"], 400, BOTH),
    ("faults", "test_faults.py", ["--cpus", "4"], 385, BOTH),
    # Metrics, probes and inspect: what an operator sees of a running instance; and isolated
    # partitions (6.12), or their fallback with one warning (6.1, alone).
    (
        "observe",
        "test_observe.py test_inspect.py test_partition.py",
        ["--cpus", "4"],
        330,
        ("6.12",),
    ),
    ("partition", "test_partition.py", ["--cpus", "4"], 90, ("6.1",)),
    ("podsim", "test_podsim.py", ["--cpus", "4"], 310, ("6.12",)),
    ("runner", "test_runner.py", ["--cpus", "4"], 300, BOTH),
    # Two NUMA nodes of two cores with two hyperthreads (node0 = CPUs 0-3, node1 = 4-7), and
    # an emulated NIC behind an IOMMU on node 1 for VFIO; its 8 CPUs also show <root>'s
    # cpu.weight at work.
    (
        "topology",
        "test_topology.py test_weight.py",
        ["--topology", "sockets=2,cores=2,threads=2", "--pci-device-node", "1"],
        250,
        ("6.12",),
    ),
    # TCG inside TCG: a real guest needs minutes here. One run proves the whole chain isolated.
    ("guest-smoke", "test_guest_smoke.py", ["--cpus", "4", "--memory", "3072"], 300, ("6.12",)),
    # Realtime (SCHED_FIFO) vCPUs, on Debian's PREEMPT_RT 6.12.
    ("realtime", "test_realtime.py", ["--cpus", "4"], 100, ("6.12-rt",)),
]
# On 6.1, these modules run only the tests whose outcome depends on the kernel series: where
# threads are placed, kept or moved across cpusets, how a peer is identified, how cgroups go
# away. What is the same on every kernel (a dead dnsmasq or virtiofsd, reaping, start-up
# refusals, the codec, kubelet's file formats) runs once, on 6.12, which keeps the suite under
# 50 minutes. (pytest -k expressions, with their share of the module's time.)
SERIES_DEPENDENT = {
    ("faults", "6.1"): ("anchor_killed or vcpu_moved or kubelet_moves", 0.5),
    ("runner", "6.1"): ("pinning_invariants or sigterm_at_each or second_sigterm", 0.6),
    (
        "controller",
        "6.1",
    ): (
        "two_pods_register or restart_leaves or stale_instance or kernel_threads "
        "or unprivileged_pod_is_placed or cannot_reach_another",
        0.6,
    ),
}
# Longest first: the suite runs on two pytest-xdist workers, and the last long ones decide
# when it ends.
INSIDE = [
    pytest.param(module, args, select, id=name)
    for name, module, args, select, _ in sorted(
        [
            (
                f"{name}-{kernel}" if name != "guest-smoke" else name,
                module,
                [*args, "--kernel", kernel],
                SERIES_DEPENDENT.get((name, kernel), ("", 1.0))[0],
                seconds * SERIES_DEPENDENT.get((name, kernel), ("", 1.0))[1],
            )
            for name, module, args, seconds, kernels in MODULES
            for kernel in kernels
        ],
        key=lambda m: -m[4],
    )
]


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize(("module", "vm_args", "select"), INSIDE)
def test_inside_vm(testvm: VMRunner, module: str, vm_args: list[str], select: str) -> None:
    if module == "test_container.py":  # the image archive, built offline (or up to date)
        image = subprocess.run([REPO / "scripts" / "image"], capture_output=True, text=True)
        assert image.returncode == 0, image.stderr
    r = testvm.run(
        *vm_args,
        "--timeout",
        "1800",  # a module takes up to 15 min while the other worker's test VM runs
        "--",
        ".venv/bin/python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfE",
        "--color=no",
        "--durations=10",
        *(("-k", select) if select else ()),
        *(f"tests/vm/inside/{m}" for m in module.split()),
        timeout=2000,
    )
    print(r.stdout)  # its slowest tests, shown with -rP
    assert r.returncode == 0, f"inside the VM:\n{r.stdout}\n{r.stderr}"
