"""Every placement rule, on the sysfs fixtures: guest topology, vCPU map, memory binding,
the numa policy and the device checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import placement, topology
from runner.cpus import parse
from runner.placement import GuestNode, PlacementError, place

from . import sysfs

TWO_SOCKETS = topology.parse(sysfs.host(2, 16, 2))  # siblings n, n+32; node1 = 16-31,48-63
ADJACENT = topology.parse(sysfs.host(1, 4, 2, numbering="adjacent"))
NO_SMT = topology.parse(sysfs.host(2, 4, 1))
EPYC = topology.parse(sysfs.host(2, 8, 2, nodes_per_package=4))  # node n: 2 cores per node
HOLES = topology.parse(sysfs.host(1, 4, 2, offline=frozenset({1, 6})))
# The test VM's --topology sockets=2,cores=2,threads=2: node0 = 0-3, node1 = 4-7.
TESTVM = topology.parse(sysfs.recorded("testvm-2s2c2t"))


def test_whole_cores_on_one_node_mirror_as_one_socket_with_threads() -> None:
    lay = place(TWO_SOCKETS, parse("16-17,48-49"), 4, 4096)
    assert (lay.sockets, lay.cores, lay.threads) == (1, 2, 2)
    assert lay.placement == (16, 48, 17, 49)  # guest siblings (0,1), (2,3) on host siblings
    assert lay.nodes == (GuestNode((0, 1, 2, 3), 4096, 1),)
    assert lay.mems == {1} and not lay.warnings


def test_the_test_vm_case() -> None:
    lay = place(TESTVM, parse("4-7"), 4, 256)
    assert (lay.sockets, lay.cores, lay.threads) == (1, 2, 2)
    assert lay.placement == (4, 5, 6, 7)
    assert lay.nodes == (GuestNode((0, 1, 2, 3), 256, 1),)


def test_spanning_two_nodes_gives_a_socket_and_bound_ram_per_node() -> None:
    lay = place(TESTVM, parse("2-5"), 4, 1024)
    assert (lay.sockets, lay.cores, lay.threads) == (2, 1, 2)
    assert lay.placement == (2, 3, 4, 5)
    assert lay.nodes == (GuestNode((0, 1), 512, 0), GuestNode((2, 3), 512, 1))
    assert lay.mems == {0, 1}
    assert "span NUMA nodes (node 0: 2-3; node 1: 4-5)" in lay.warnings[0]


def test_uneven_nodes_split_one_socket_and_ram_in_proportion() -> None:
    lay = place(NO_SMT, parse("2-3,4"), 3, 900)
    assert (lay.sockets, lay.cores, lay.threads) == (1, 3, 1)
    assert lay.nodes == (GuestNode((0, 1), 600, 0), GuestNode((2,), 300, 1))


def test_half_a_core_gives_one_thread_per_core_and_a_warning() -> None:
    lay = place(TESTVM, parse("4-6"), 3, 300)
    assert lay.threads == 1 and (lay.sockets, lay.cores) == (1, 3)
    assert lay.placement == (4, 5, 6)
    assert "CPUs 6 are part of cores whose other hyperthreads (7)" in lay.warnings[0]


def test_strict_refuses_half_cores_and_spans_naming_cpus_and_nodes() -> None:
    with pytest.raises(PlacementError, match=r"numa strict: CPUs 6 are part of cores .*\(7\)"):
        place(TESTVM, parse("4-6"), 3, 300, numa="strict")
    with pytest.raises(PlacementError, match=r"span NUMA nodes \(node 0: 3; node 1: 4\)"):
        place(NO_SMT, parse("3-4"), 2, 64, numa="strict")


def test_one_node_hosts_leave_ram_unbound() -> None:
    lay = place(ADJACENT, parse("2-5"), 4, 64)
    assert lay.nodes == (GuestNode((0, 1, 2, 3), 64, None),) and lay.mems == {0}


def test_a_node_without_memory_binds_to_the_nearest_node_with_some() -> None:
    # Four nodes; node 1 has CPUs but no memory. Nearest with memory: node 0 (12 < 32).
    snap = sysfs.host(2, 8, 2, nodes_per_package=2) | {"devices/system/node/has_memory": "0,2-3"}
    host = topology.parse(snap)
    assert host.memory_node(1) == 0 and host.memory_node(2) == 2
    pod = host.cpus_of_node(1)
    lay = place(host, pod, len(pod), 256)
    assert [n.host_node for n in lay.nodes] == [0]
    assert lay.mems == host.mems_of(pod) == {0}


def test_no_smt_host() -> None:
    lay = place(NO_SMT, parse("4-7"), 4, 64)
    assert (lay.sockets, lay.cores, lay.threads) == (1, 4, 1) and not lay.warnings


def test_adjacent_numbering() -> None:
    lay = place(ADJACENT, parse("2-5"), 4, 64)
    assert lay.threads == 2 and lay.placement == (2, 3, 4, 5)


def test_four_nodes_per_socket() -> None:
    # Node 1 is cores 2-3 of package 0: CPUs 2-3 and their siblings 18-19.
    lay = place(EPYC, parse("2-3,18-19"), 4, 2048)
    assert (lay.sockets, lay.cores, lay.threads) == (1, 2, 2)
    assert lay.placement == (2, 18, 3, 19)
    assert lay.nodes == (GuestNode((0, 1, 2, 3), 2048, 1),)


def test_holes_in_the_cpu_list() -> None:
    # CPU 5's sibling 1 is offline: a core of one online thread is whole.
    lay = place(HOLES, parse("5"), 1, 64)
    assert lay.threads == 1 and not lay.warnings
    with pytest.raises(PlacementError, match="CPUs 1 are not online"):
        place(HOLES, parse("1,5"), 2, 64)


def test_flat_keeps_the_old_map_and_binds_nothing() -> None:
    lay = place(TESTVM, parse("2-5"), 4, 64, mode="flat")
    assert (lay.sockets, lay.cores, lay.threads) == (1, 4, 1)
    assert lay.placement == (2, 3, 4, 5) and not lay.bound
    assert lay.mems == {0, 1}  # the instance cgroup's mems follow its CPUs all the same


def test_spare_cpus_take_whole_cores_on_the_fullest_node() -> None:
    lay = place(TESTVM, parse("3-7"), 2, 64)
    assert lay.placement == (4, 5) and lay.threads == 2 and lay.mems == {1}


def test_hugepages_split_in_whole_pages() -> None:
    lay = place(TESTVM, parse("2-5"), 4, 3072, hugepages="1G")
    assert [n.memory_mib for n in lay.nodes] == [2048, 1024]
    with pytest.raises(PlacementError, match="cannot be split over 2 NUMA nodes in 1024 MiB"):
        place(TESTVM, parse("2-5"), 4, 1024, hugepages="1G")
    with pytest.raises(PlacementError, match="not a whole number of 2 MiB pages"):
        place(TESTVM, parse("4-7"), 4, 1025, hugepages="2M")


def test_device_on_the_vcpus_node_lands_on_that_guest_node() -> None:
    host = topology.parse(
        sysfs.host(2, 2, 2, numbering="adjacent", devices={"0000:65:00.0": sysfs.gpu(1, 9)})
    )
    (dev,) = placement.check_devices(host, ["0000:65:00.0"])
    lay = place(host, parse("2-5"), 4, 64, devices=[dev])
    assert lay.device_nodes == (1,)
    lay = place(host, parse("0-3"), 4, 64, devices=[dev])  # node 0 only
    assert lay.device_nodes == (None,)
    assert "device 0000:65:00.0 is on NUMA node 1, the vCPUs on 0" in lay.warnings
    with pytest.raises(PlacementError, match=r"device 0000:65:00\.0 is on NUMA node 1"):
        place(host, parse("0-3"), 4, 64, devices=[dev], numa="strict")


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ({}, "no such PCI device"),
        ({"0000:65:00.0": {"numa_node": "0", "driver": "-> nvidia"}}, "has no IOMMU group"),
        ({"0000:65:00.0": sysfs.gpu(0, 3, driver="nvidia")}, "bound to nvidia, not vfio-pci"),
        (
            {"0000:65:00.0": sysfs.gpu(0, 3), "0000:65:00.1": sysfs.gpu(0, 3, "snd_hda_intel")},
            "IOMMU group 3 also holds 0000:65:00.1 \\(bound to snd_hda_intel\\)",
        ),
    ],
)
def test_device_refusals(devices: dict[str, dict[str, str]], message: str) -> None:
    host = topology.parse(sysfs.host(1, 2, 1, devices=devices))
    with pytest.raises(PlacementError, match=message):
        placement.check_devices(host, ["0000:65:00.0"])


def test_a_group_may_hold_bridges_and_driverless_or_stubbed_devices() -> None:
    bridge = {"iommu_group": "-> 3", "driver": "-> pcieport", "class": "0x060400"}
    idle = {"iommu_group": "-> 3", "class": "0x040300", "driver": "-> pci-stub"}
    host = topology.parse(
        sysfs.host(
            1,
            2,
            1,
            devices={"0000:64:00.0": bridge, "0000:65:00.0": sysfs.gpu(0, 3), "0000:65:00.1": idle},
        )
    )
    assert [d.address for d in placement.check_devices(host, ["0000:65:00.0"])] == ["0000:65:00.0"]


HOSTS = [TWO_SOCKETS, ADJACENT, NO_SMT, EPYC, HOLES, TESTVM]


@given(st.sampled_from(HOSTS), st.data())
def test_invariants(host: topology.Host, data: st.DataObject) -> None:
    online = sorted(host.online)
    pod = frozenset(data.draw(st.sets(st.sampled_from(online), min_size=1, max_size=8)))
    lay = place(host, pod, len(pod), 64 * len(pod))
    # Every CPU once; the shape multiplies out; RAM adds up, bound to the CPUs' nodes.
    assert sorted(lay.placement) == sorted(pod)
    assert lay.sockets * lay.cores * lay.threads == len(pod)
    assert sum(n.memory_mib for n in lay.nodes) == 64 * len(pod)
    assert lay.mems == host.nodes_of(pod)
    if len(host.nodes) == 1:  # nowhere else for RAM to go: not bound
        assert [n.host_node for n in lay.nodes] == [None]
    else:
        assert {n.host_node for n in lay.nodes} == lay.mems
        for node in lay.nodes:  # each guest node's vCPUs run on its host node
            assert {host.cpus[lay.placement[v]].node for v in node.vcpus} == {node.host_node}
    # Guest siblings are host siblings, and never shown where the host has none.
    t = lay.threads
    for core in range(len(pod) // t):
        group = set(lay.placement[core * t : core * t + t])
        assert group == host.cpus[lay.placement[core * t]].siblings if t > 1 else len(group) == 1
