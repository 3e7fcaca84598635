"""The sysfs model, over snapshots of the hosts the planner must handle."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import topology
from runner.cpus import parse

from . import sysfs


def test_interleaved_siblings_on_two_sockets() -> None:
    h = topology.parse(sysfs.host(2, 16, 2))  # CPU n and n+32 share a core
    assert len(h.cpus) == 64 and h.smt
    assert h.cpus[5].siblings == {5, 37} and h.cpus[37].siblings == {5, 37}
    assert h.cpus[5].node == 0 and h.cpus[21].node == 1 and h.cpus[53].node == 1
    assert h.cpus[21].package == 1 and h.cpus[21].core == 5
    assert h.distances == {0: (10, 32), 1: (32, 10)}
    assert h.nodes_of(parse("4-5,36-37")) == {0}
    assert h.nodes_of(parse("15-16")) == {0, 1}


def test_adjacent_siblings() -> None:
    h = topology.parse(sysfs.host(1, 4, 2, numbering="adjacent"))
    assert h.cpus[2].siblings == {2, 3} and h.cpus[3].core == 1


def test_no_smt() -> None:
    h = topology.parse(sysfs.host(2, 4, 1))
    assert not h.smt
    assert all(c.siblings == {c.id} for c in h.cpus.values())


def test_four_nodes_per_socket() -> None:
    h = topology.parse(sysfs.host(2, 8, 2, nodes_per_package=4))
    assert h.nodes == set(range(8))
    assert h.cpus_of_node(5) == {10, 11, 26, 27}
    assert h.distances[0] == (10, 12, 12, 12, 32, 32, 32, 32)


def test_cpu_list_with_holes() -> None:
    h = topology.parse(sysfs.host(1, 4, 2, offline=frozenset({1, 6})))
    assert sorted(h.cpus) == [0, 2, 3, 4, 5, 7]
    assert h.cpus[5].siblings == {5}  # its sibling 1 is offline


def test_without_numa_everything_is_node_0() -> None:
    snap = {k: v for k, v in sysfs.host(1, 2, 1).items() if "/node/" not in k}
    assert topology.parse(snap).nodes == {0}


def test_pci_devices_and_groups() -> None:
    snap = sysfs.host(
        2,
        2,
        1,
        devices={
            "0000:65:00.0": sysfs.gpu(1, 40),
            "0000:65:00.1": sysfs.gpu(1, 40, driver="snd_hda_intel"),
            "0000:00:1f.0": {"numa_node": "-1", "class": "0x060100"},
        },
    )
    h = topology.parse(snap)
    gpu = h.devices["0000:65:00.0"]
    assert (gpu.node, gpu.iommu_group, gpu.driver) == (1, 40, "vfio-pci")
    assert [d.address for d in h.group(40)] == ["0000:65:00.0", "0000:65:00.1"]
    lpc = h.devices["0000:00:1f.0"]
    assert (lpc.node, lpc.iommu_group, lpc.driver) == (None, None, None)


def test_record_reads_a_sysfs_tree(tmp_path: Path) -> None:
    snap = sysfs.host(1, 2, 2, devices={"0000:01:00.0": {"numa_node": "0"}})
    for key, value in snap.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_text(value + "\n")
    dev = tmp_path / "bus/pci/devices/0000:01:00.0"
    (dev / "iommu_group").symlink_to("../../../kernel/iommu_groups/7")
    (dev / "driver").symlink_to("../../../bus/pci/drivers/vfio-pci")
    got = topology.record(tmp_path)
    assert got["bus/pci/devices/0000:01:00.0/iommu_group"] == "-> 7"
    assert topology.parse(got) == topology.parse(
        snap
        | {
            "bus/pci/devices/0000:01:00.0/iommu_group": "-> 7",
            "bus/pci/devices/0000:01:00.0/driver": "-> vfio-pci",
        }
    )


def test_not_a_sysfs(tmp_path: Path) -> None:
    with pytest.raises(topology.TopologyError, match="not a sysfs"):
        topology.record(tmp_path)


def test_the_recorded_test_vm_is_what_the_fixtures_model() -> None:
    # `instance-runner topology --record` in `scripts/testvm --topology sockets=2,cores=2,threads=2`
    h = topology.parse(sysfs.recorded("testvm-2s2c2t"))
    model = topology.parse(sysfs.host(2, 2, 2, numbering="adjacent"))
    assert h.cpus == model.cpus
    assert h.distances == {0: (10, 20), 1: (20, 10)}


def test_unreadable_topology_is_one_error_and_odd_devices_are_unknown() -> None:
    snap = sysfs.host(1, 2, 1) | {"devices/system/cpu/cpu0/topology/core_id": "x"}
    with pytest.raises(topology.TopologyError, match="CPU 0: unreadable topology"):
        topology.parse(snap)
    snap = sysfs.host(1, 2, 1) | {"devices/system/node/node0/cpulist": "0-"}
    with pytest.raises(topology.TopologyError, match="unreadable sysfs topology"):
        topology.parse(snap)
    odd = {"numa_node": "", "class": "zz"}
    dev = topology.parse(sysfs.host(1, 2, 1, devices={"0000:01:00.0": odd})).devices
    assert (dev["0000:01:00.0"].node, dev["0000:01:00.0"].pci_class) == (None, None)
