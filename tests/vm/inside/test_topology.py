"""Placement on a two-node host with hyperthreads (the test VM with --topology
sockets=2,cores=2,threads=2: node0 = CPUs 0-3, node1 = 4-7, siblings 2k and 2k+1): the guest
topology QEMU is given, vCPU threads on host siblings, the instance cgroup's memory nodes, and
guest RAM bound to the vCPUs' nodes as /proc/<qemu>/numa_maps shows it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from .conftest import Node, wait_for
from .pods import (
    INSTANCES,
    assert_nothing_left,
    assert_placed,
    cpu_list,
    events,
    host_vcpus,
    pod_process,
    start_runner,
    write_spec,
)

ONLINE = set(range(8))


@pytest.fixture(autouse=True)
def two_nodes() -> None:
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    if [cpu_list((n / "cpulist").read_text()) for n in nodes] != [{0, 1, 2, 3}, {4, 5, 6, 7}]:
        pytest.skip("needs scripts/testvm --topology sockets=2,cores=2,threads=2")


def smp(qemu: int) -> str:
    argv = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"-smp") + 1].decode()


def ram_mappings(qemu: int, mib: int) -> list[str]:
    """numa_maps lines of the guest RAM backends (anonymous mappings with a policy)."""
    lines = Path(f"/proc/{qemu}/numa_maps").read_text().splitlines()
    return [line for line in lines if " bind:" in line]


def pages_by_node(line: str) -> dict[int, int]:
    return {int(n): int(c) for n, c in re.findall(r" N(\d+)=(\d+)", line)}


def run_pod(node: Node, tmp: Path, cpus: str, **spec: object):  # type: ignore[no-untyped-def]
    path = write_spec(tmp, vcpus=len(cpu_list(cpus)), memory_mib=64, **spec)
    return start_runner(node, tmp, cpus, spec=path)


def finish(rp) -> str:  # type: ignore[no-untyped-def]
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    assert_nothing_left(rp.pod.uid)
    return err


def test_whole_cores_on_node_1_mirror_as_siblings_with_ram_on_node_1(
    node: Node, tmp_path: Path
) -> None:
    rp = run_pod(node, tmp_path, "4-7")
    ready = rp.wait_ready()
    assert_placed(rp.runner_pid(), rp.pod.uid, {4, 5, 6, 7}, ONLINE)
    topo = ready["guest_topology"]
    assert (topo["sockets"], topo["cores"], topo["threads"]) == (1, 2, 2)
    assert topo["numa_nodes"] == [{"vcpus": [0, 1, 2, 3], "memory_mib": 64, "host_node": 1}]
    qemu = pod_process(rp, "qemu-system")
    assert smp(qemu) == "4,sockets=1,cores=2,threads=2"
    # Guest sibling pairs (vCPUs 0-1, 2-3) on host sibling pairs.
    on = {v["vcpu"]: os.sched_getaffinity(v["tid"]) for v in host_vcpus(rp, ready)}
    assert on == {0: {4}, 1: {5}, 2: {6}, 3: {7}}
    for pair in ((0, 1), (2, 3)):
        cpu = next(iter(on[pair[0]]))
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        assert cpu_list(siblings.read_text()) == on[pair[0]] | on[pair[1]]
    instance = INSTANCES / f"instance-{rp.pod.uid}"
    assert (instance / "cpuset.mems").read_text().strip() == "1"
    (ram,) = ram_mappings(qemu, 64)
    assert " bind:1 " in ram
    pages = pages_by_node(ram)
    assert pages.get(1, 0) * 4096 >= 60 * 2**20 and not pages.get(0), ram  # preallocated on N1
    finish(rp)


def test_a_pod_across_both_nodes_gets_two_guest_nodes_bound_to_both(
    node: Node, tmp_path: Path
) -> None:
    rp = run_pod(node, tmp_path, "2-5")
    ready = rp.wait_ready()
    topo = ready["guest_topology"]
    assert (topo["sockets"], topo["cores"], topo["threads"]) == (2, 1, 2)
    assert [(n["vcpus"], n["host_node"]) for n in topo["numa_nodes"]] == [
        ([0, 1], 0),
        ([2, 3], 1),
    ]
    instance = INSTANCES / f"instance-{rp.pod.uid}"
    assert (instance / "cpuset.mems").read_text().strip() == "0-1"
    qemu = pod_process(rp, "qemu-system")
    bound = {}
    for line in ram_mappings(qemu, 32):
        (host_node,) = re.findall(r" bind:(\d+) ", line)
        bound[int(host_node)] = pages_by_node(line)
    assert set(bound) == {0, 1}
    for host_node, pages in bound.items():
        assert set(pages) == {host_node}, bound  # each guest node's RAM on its own host node
    err = finish(rp)
    (warning,) = events(err, "placement")
    assert "span NUMA nodes (node 0: 2-3; node 1: 4-5)" in warning["detail"]


def test_half_a_core_gives_one_thread_per_core_or_a_refusal_under_strict(
    node: Node, tmp_path: Path
) -> None:
    rp = run_pod(node, tmp_path, "4-6")
    ready = rp.wait_ready()
    topo = ready["guest_topology"]
    assert (topo["sockets"], topo["cores"], topo["threads"]) == (1, 3, 1)
    assert smp(pod_process(rp, "qemu-system")) == "3,sockets=1,cores=3,threads=1"
    err = finish(rp)
    (warning,) = events(err, "placement")
    assert "CPUs 6 are part of cores whose other hyperthreads (7)" in warning["detail"]

    strict = tmp_path / "strict"
    strict.mkdir()
    rp = run_pod(node, strict, "4-6", numa="strict")
    code, err = rp.finish()
    assert code == 1
    lines = [json.loads(line) for line in err.splitlines() if '"level": "error"' in line]
    assert len(lines) == 1
    assert "numa strict: CPUs 6 are part of cores whose other hyperthreads (7)" in str(lines[0])
    assert_nothing_left(rp.pod.uid)


def test_flat_keeps_one_unbound_block(node: Node, tmp_path: Path) -> None:
    rp = run_pod(node, tmp_path, "4-7", topology="flat")
    ready = rp.wait_ready()
    assert ready["guest_topology"]["numa_nodes"] == []
    qemu = pod_process(rp, "qemu-system")
    assert smp(qemu) == "4"
    assert not ram_mappings(qemu, 64)
    assert (INSTANCES / f"instance-{rp.pod.uid}" / "cpuset.mems").read_text().strip() == "1"
    finish(rp)


# --- PCI passthrough: an emulated NIC on node 1 (scripts/testvm --pci-device-node 1) ---------


@pytest.fixture
def device() -> str:
    """The emulated NIC on node 1, bound to vfio-pci: its PCI address."""
    found = [
        d
        for d in Path("/sys/bus/pci/devices").iterdir()
        if (d / "class").read_text().strip() == "0x020000"
        and (d / "numa_node").read_text().strip() == "1"
    ]
    if not found:
        pytest.skip("needs scripts/testvm --pci-device-node 1")
    (dev,) = found
    if not (dev / "driver").exists():
        (dev / "driver_override").write_text("vfio-pci")
        Path("/sys/bus/pci/drivers_probe").write_text(dev.name)
    assert os.path.basename(os.readlink(dev / "driver")) == "vfio-pci"
    return dev.name


def qmp(path: str, *commands: dict) -> list[object]:
    """A second QMP monitor of the runner's QEMU (from the spec's extra_args), for probing."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(path)
        reader = s.makefile("r")
        json.loads(reader.readline())  # the greeting
        answers = []
        for command in ({"execute": "qmp_capabilities"}, *commands):
            s.sendall(json.dumps(command).encode() + b"\n")
            while "return" not in (answer := json.loads(reader.readline())):
                assert "error" not in answer, answer
            answers.append(answer["return"])
        return answers[1:]


def find_pci(buses: list[dict], qdev_id: str, path: tuple = ()) -> tuple | None:
    """(bus numbers and bridges down to the device) for a device in query-pci's answer."""
    for bus in buses:
        for dev in bus["devices"]:
            here = (*path, bus["bus"], dev["qdev_id"])
            if dev["qdev_id"] == qdev_id:
                return here
            below = dev.get("pci_bridge", {}).get("devices")
            if below:
                got = find_pci(
                    [{"bus": dev["pci_bridge"]["bus"]["secondary"], "devices": below}],
                    qdev_id,
                    here,
                )
                if got:
                    return got
    return None


def test_a_device_on_node_1_is_passed_through_on_the_guest_node_of_node_1(
    node: Node, tmp_path: Path, device: str
) -> None:
    probe = f"/run/probe-{os.getpid()}.qmp"  # short: a Unix socket path
    spec = write_spec(
        tmp_path,
        vcpus=4,
        memory_mib=64,
        devices=[{"address": device}],
        numa="strict",
        extra_args=["-qmp", f"unix:{probe},server=on,wait=off"],
    )
    rp = start_runner(node, tmp_path, "4-7", spec=spec)
    ready = rp.wait_ready()
    assert ready["guest_topology"]["device_nodes"] == [0]  # guest node 0 mirrors host node 1
    qemu = pod_process(rp, "qemu-system")
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{device}/iommu_group"))
    held = {os.readlink(f"/proc/{qemu}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu}/fd")}
    assert any(h.endswith(f"/dev/vfio/{group}") for h in held), held  # chroot-prefixed here
    # The firmware numbers the buses once the guest runs: then query-pci shows the device
    # behind its root port on the expander bridge, whose NUMA node is guest node 0.
    where = wait_for(
        lambda: find_pci(qmp(probe, {"execute": "query-pci"})[0], "dev0"),  # type: ignore[arg-type]
        timeout=180,
        what="the passed-through device in query-pci",
    )
    assert where[1:] == ("rp0", where[2], "dev0") and where[0] == 128, where
    (numa,) = qmp(
        probe,
        {
            "execute": "qom-get",
            "arguments": {"path": "/machine/peripheral/pxb0", "property": "numa_node"},
        },
    )
    assert numa == 0
    finish(rp)


def test_a_device_on_another_node_than_the_vcpus(node: Node, tmp_path: Path, device: str) -> None:
    rp = run_pod(node, tmp_path, "0-3", devices=[{"address": device}], numa="strict")
    code, err = rp.finish()
    assert code == 1
    (line,) = [json.loads(x) for x in err.splitlines() if '"level": "error"' in x]
    assert f"device {device} is on NUMA node 1, the vCPUs on 0" in str(line)
    assert_nothing_left(rp.pod.uid)

    prefer = tmp_path / "prefer"
    prefer.mkdir()
    rp = run_pod(node, prefer, "0-3", devices=[{"address": device}])
    ready = rp.wait_ready()
    assert ready["guest_topology"]["device_nodes"] == [None]
    err = finish(rp)
    assert any(
        f"device {device} is on NUMA node 1" in w["detail"] for w in events(err, "placement")
    )
