"""Isolated cpuset partitions (kernel 6.7+): an instance's CPUs taken out of the scheduler's
load balancing and out of every other cgroup's effective CPUs while it runs.

An instance cgroup is not a child of the root partition but a grandchild (`<root>/instance-*`),
so it becomes a *remote* partition (Documentation/admin-guide/cgroup-v2.rst, "cpuset.cpus.
exclusive"): every ancestor below the cgroup root must list its CPUs in its own
`cpuset.cpus.exclusive` first. The kernel takes them from the root partition, so kubepods and
the pod's container cgroup lose them from `cpuset.cpus.effective` (never from `cpuset.cpus`,
kubelet's view) until the partition is undone.

The rule for `<root>`'s exclusive CPUs is pure (`root_exclusive`); the writes are thin.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Literal

from runner import cpus
from runner.cpus import CpuSet
from runner.log import log
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.node.layout import INSTANCE_PREFIX

PartitionMode = Literal["none", "isolated"]
EXCLUSIVE = "cpuset.cpus.exclusive"
PARTITION = "cpuset.cpus.partition"
# The rule an exclusive write obeys, for errors (cgroup-v2.rst, cpuset.cpus.exclusive).
RULE = (
    "cgroup-v2.rst, cpuset.cpus.exclusive: a cgroup's exclusive CPUs must lie within its "
    "parent's and must not overlap a sibling's"
)


class PartitionError(Exception):
    """The kernel would not make (or undo) the partition; the message names the file and rule."""


def parse_state(text: str) -> tuple[str, str | None]:
    """`cpuset.cpus.partition` as (state, why it is invalid or None): "isolated",
    "isolated invalid (Parent is not a partition root)", "member", "root"."""
    text = text.strip()
    state, _, rest = text.partition(" ")
    if rest.startswith("invalid"):
        return state, rest.removeprefix("invalid").strip().strip("()") or "invalid"
    return state, None


def root_exclusive(claimed: Iterable[CpuSet]) -> CpuSet:
    """`<root>`'s cpuset.cpus.exclusive: exactly the CPUs its isolated instances claim. Larger
    would keep CPUs from float after an instance is gone; smaller is refused by the kernel."""
    return frozenset().union(*claimed)


def supported(cg: CgroupFS, root: str) -> bool:
    return (cg.dir(root) / EXCLUSIVE).exists()


def claims(cg: CgroupFS, instances: Iterable[str]) -> list[CpuSet]:
    """The exclusive CPUs each instance cgroup holds ("" for one that is no partition)."""
    out = []
    for path in instances:
        try:
            out.append(cpus.parse(cg.read(path, EXCLUSIVE)))
        except (CgroupError, cpus.CpuListError):
            continue  # removed under us, or no such file
    return out


def isolate(cg: CgroupFS, root: str, instance: str, cpu_set: CpuSet) -> None:
    """Make `instance` an isolated partition of `cpu_set`; on failure nothing is left claimed.
    The claim is retried: in embedded mode another runner may rewrite `<root>`'s claim between
    our two writes (it reads ours only once our instance holds it)."""
    try:
        for attempt in range(3):
            have = cpus.parse(cg.read(root, EXCLUSIVE))
            try:
                _write(cg, root, EXCLUSIVE, cpus.format(have | cpu_set))
                _write(cg, instance, EXCLUSIVE, cpus.format(cpu_set))
                break
            except PartitionError:
                if attempt == 2:
                    raise
        _write(cg, instance, PARTITION, "isolated")
        state, invalid = parse_state(cg.read(instance, PARTITION))
        if state != "isolated" or invalid:
            raise PartitionError(
                f"{cg.dir(instance) / PARTITION} reads {state!r}"
                + (f", invalid: {invalid}" if invalid else "")
            )
    except (PartitionError, CgroupError):
        with contextlib.suppress(PartitionError, CgroupError):
            undo(cg, root, instance)
        raise


def undo(cg: CgroupFS, root: str, instance: str) -> None:
    """The instance back to a member, its CPUs back to the root partition. Safe on a half-made
    partition, on one that is no partition, and on an instance cgroup that is gone."""
    if not supported(cg, root):
        return
    if cg.exists(instance):
        for name, value in ((PARTITION, "member"), (EXCLUSIVE, "\n")):
            try:
                cg.write(instance, name, value)
            except CgroupError:
                if cg.exists(instance):
                    raise
    want = root_exclusive(claims(cg, _siblings(cg, root, instance)))
    have = cpus.parse(cg.read(root, EXCLUSIVE))
    if have != want:
        _write(cg, root, EXCLUSIVE, cpus.format(want))


def trim(cg: CgroupFS, root: str, instances: Iterable[str]) -> None:
    """After stale instances were removed: `<root>` claims only what the others still hold."""
    if not supported(cg, root):
        return
    want = root_exclusive(claims(cg, instances))
    if cpus.parse(cg.read(root, EXCLUSIVE)) != want:
        _write(cg, root, EXCLUSIVE, cpus.format(want))


def _siblings(cg: CgroupFS, root: str, instance: str) -> list[str]:
    return [
        p
        for p in cg.children(root)
        if p != instance and p.rsplit("/", 1)[1].startswith(INSTANCE_PREFIX)
    ]


def _write(cg: CgroupFS, cgroup: str, name: str, value: str) -> None:
    try:
        cg.write(cgroup, name, value or "\n")  # a write of no bytes never reaches the kernel
    except CgroupError as e:
        rule = f" ({RULE})" if name == EXCLUSIVE else ""
        raise PartitionError(f"{e}{rule}") from None


def isolate_or_warn(cg: CgroupFS, root: str, instance: str, own: CpuSet) -> bool:
    """The instance CPUs as an isolated partition where the kernel has them (6.7+); one
    warning and no partition where it does not. The one place both modes decide it."""
    if not supported(cg, root):
        log.warning(
            "partition-unsupported",
            detail="this kernel has no cpuset.cpus.exclusive (isolated partitions need 6.7+): "
            "the instance CPUs stay in the scheduler's load balancing",
        )
        return False
    isolate(cg, root, instance, own)
    log.info("partition-isolated", cgroup=instance, cpus=cpus.format(own))
    return True
