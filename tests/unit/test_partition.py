"""The partition rules and the order of writes, on a cgroup tree of plain files. The kernel's
side (the partition really isolated, the CPUs out of the scheduler's domains) is proven in
the test VM: tests/vm/inside/test_partition.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.node import partition
from runner.node.cgroupfs import CgroupFS

ROOT = "/instances"


class FileTree(CgroupFS):
    """cgroupfs files as plain files: a write replaces the value, as the kernel's do."""

    def write(self, cgroup: str, name: str, value: str) -> None:
        (self.dir(cgroup) / name).write_text(value)


def tree(tmp_path: Path, instances: dict[str, str]) -> CgroupFS:
    """<root> with cpuset.cpus.exclusive, and instance cgroups with the exclusive CPUs given."""
    (tmp_path / "instances").mkdir()
    (tmp_path / "instances" / "float").mkdir()
    claimed = ",".join(v for v in instances.values() if v)
    (tmp_path / "instances" / partition.EXCLUSIVE).write_text(claimed + "\n")
    for name, excl in instances.items():
        d = tmp_path / "instances" / f"instance-{name}"
        d.mkdir()
        (d / partition.EXCLUSIVE).write_text(excl + "\n")
        (d / partition.PARTITION).write_text(("isolated" if excl else "member") + "\n")
    return FileTree(tmp_path)


def read(cg: CgroupFS, cgroup: str, name: str) -> str:
    return cg.read(cgroup, name).strip()


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("member\n", ("member", None)),
        ("isolated\n", ("isolated", None)),
        ("root\n", ("root", None)),
        (
            "isolated invalid (Parent is not a partition root)\n",
            ("isolated", "Parent is not a partition root"),
        ),
        ("root invalid\n", ("root", "invalid")),
    ],
)
def test_partition_state_as_the_kernel_writes_it(text: str, state: tuple) -> None:
    assert partition.parse_state(text) == state


def test_the_root_claims_exactly_what_its_instances_claim() -> None:
    assert partition.root_exclusive([]) == frozenset()
    assert partition.root_exclusive([frozenset({1, 2}), frozenset(), frozenset({5})]) == {1, 2, 5}


def test_isolate_claims_up_the_tree_then_partitions(tmp_path: Path) -> None:
    cg = tree(tmp_path, {"b": "3"})
    a = f"{ROOT}/instance-a"
    cg.dir(a).mkdir()
    for name in (partition.EXCLUSIVE, partition.PARTITION):
        (cg.dir(a) / name).write_text("\n")
    partition.isolate(cg, ROOT, a, frozenset({1, 2}))
    assert read(cg, ROOT, partition.EXCLUSIVE) == "1-3"
    assert read(cg, a, partition.EXCLUSIVE) == "1-2"
    assert read(cg, a, partition.PARTITION) == "isolated"

    partition.undo(cg, ROOT, a)
    assert read(cg, a, partition.PARTITION) == "member"
    assert read(cg, a, partition.EXCLUSIVE) == ""
    assert read(cg, ROOT, partition.EXCLUSIVE) == "3"  # b keeps its claim


class RefusingKernel(FileTree):
    """A kernel that takes the partition write but reports it invalid."""

    def read(self, cgroup: str, name: str) -> str:
        if name == partition.PARTITION and cgroup.endswith("instance-a"):
            return "isolated invalid (Parent is not a partition root)\n"
        return super().read(cgroup, name)


def test_an_invalid_partition_is_an_error_and_leaves_no_claim(tmp_path: Path) -> None:
    tree(tmp_path, {"a": ""})
    cg = RefusingKernel(tmp_path)
    a = f"{ROOT}/instance-a"
    with pytest.raises(partition.PartitionError, match="invalid: Parent is not a partition root"):
        partition.isolate(cg, ROOT, a, frozenset({1}))
    assert read(cg, ROOT, partition.EXCLUSIVE) == ""
    assert read(cg, a, partition.EXCLUSIVE) == ""


def test_undo_of_a_removed_instance_gives_its_cpus_back(tmp_path: Path) -> None:
    cg = tree(tmp_path, {"b": "4"})
    (cg.dir(ROOT) / partition.EXCLUSIVE).write_text("1-2,4\n")  # a's claim, a already gone
    partition.undo(cg, ROOT, f"{ROOT}/instance-a")
    assert read(cg, ROOT, partition.EXCLUSIVE) == "4"
    (cg.dir(ROOT) / partition.EXCLUSIVE).write_text("1-2,4\n")
    partition.trim(cg, ROOT, [f"{ROOT}/instance-b"])
    assert read(cg, ROOT, partition.EXCLUSIVE) == "4"


def test_without_the_kernel_files_nothing_is_written(tmp_path: Path) -> None:
    (tmp_path / "instances" / "instance-a").mkdir(parents=True)
    cg = FileTree(tmp_path)
    assert not partition.supported(cg, ROOT)
    partition.undo(cg, ROOT, f"{ROOT}/instance-a")
    partition.trim(cg, ROOT, [f"{ROOT}/instance-a"])
    assert partition.isolate_or_warn(cg, ROOT, f"{ROOT}/instance-a", frozenset({1})) is False
    assert list((tmp_path / "instances").rglob("cpuset.*")) == []
