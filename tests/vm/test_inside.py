"""Boots the test VM and runs tests/vm/inside/<module> there (or several modules, in one
VM), as root on pure cgroup v2."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import REPO, VMRunner

# Longest first (seconds on a 2-core machine, one test VM per core, measured): the suite runs
# on two pytest-xdist workers, and these few tests decide when it ends. Both Debian kernel
# series are covered: 6.1 (the default) and 6.12, which differ in how affinity survives cpuset
# changes (6.2+) and in partitions (6.7+). The runner's own module runs on both; the others
# are shared out between them, as running all on both would take the suite past 45 minutes.
INSIDE = [
    pytest.param("test_node_faults.py", ["--cpus", "4"], [], id="node-faults"),  # 520
    pytest.param(
        "test_controller.py", ["--cpus", "4", "--kernel", "6.12"], [], id="controller-6.12"
    ),  # 490
    pytest.param("test_podsim.py", ["--cpus", "4"], [], id="podsim"),  # 410
    # The image under podman and crun: its layers and two containers live in the VM's memory.
    pytest.param(
        "test_container.py", ["--cpus", "4", "--memory", "4096"], [], id="container"
    ),  # 405
    pytest.param("test_faults.py", ["--cpus", "4", "--kernel", "6.12"], [], id="faults-6.12"),
    pytest.param("test_runner.py", ["--cpus", "4"], [], id="runner"),  # 320
    pytest.param("test_runner.py", ["--cpus", "4", "--kernel", "6.12"], [], id="runner-6.12"),
    # Metrics, probes and inspect: what an operator sees of a running instance; and isolated
    # partitions falling back on 6.1 (three modules, one test VM).
    pytest.param(
        "test_observe.py test_inspect.py test_partition.py", ["--cpus", "4"], [], id="observe"
    ),  # 290
    # Two NUMA nodes of two cores with two hyperthreads (node0 = CPUs 0-3, node1 = 4-7), and
    # an emulated NIC behind an IOMMU on node 1 for VFIO; its 8 CPUs also show <root>'s
    # cpu.weight at work.
    pytest.param(
        "test_topology.py test_weight.py",
        ["--topology", "sockets=2,cores=2,threads=2", "--pci-device-node", "1"],
        [],
        id="topology",
    ),  # 290
    # TCG inside TCG: a real guest needs minutes here. One run proves the whole chain isolated.
    pytest.param(
        "test_guest_smoke.py", ["--cpus", "4", "--memory", "3072"], [], id="guest-smoke"
    ),  # 220
    # 6.2+ keeps a thread's requested affinity across cpuset changes: float growing under
    # running threads is proven again on 6.12; 6.7+ has isolated partitions.
    pytest.param(
        "test_node_faults.py test_partition.py",
        ["--cpus", "4", "--kernel", "6.12"],
        ["-k", "float_growth or partition"],
        id="node-faults-6.12",
    ),  # 190
    # Realtime (SCHED_FIFO) vCPUs, on Debian's PREEMPT_RT 6.12.
    pytest.param(
        "test_realtime.py", ["--cpus", "4", "--kernel", "6.12-rt"], [], id="realtime-6.12-rt"
    ),  # 130
]


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize(("module", "vm_args", "select"), INSIDE)
def test_inside_vm(testvm: VMRunner, module: str, vm_args: list[str], select: list[str]) -> None:
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
        *(f"tests/vm/inside/{m}" for m in module.split()),
        *select,
        timeout=2000,
    )
    print(r.stdout)  # its slowest tests, shown with -rP
    assert r.returncode == 0, f"inside the VM:\n{r.stdout}\n{r.stderr}"
