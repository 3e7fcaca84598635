"""float, bounded per pod. Everything a VM pod runs on the shared CPUs (its runner, QEMU's
main loop and I/O threads, virtiofsd, dnsmasq, whatever is exec'd into it and swept out of
its container cgroup) lives in `<root>/float/pod-<uid>`, a threaded child of float with the
pod's own `pids.max` and `cpu.max` (pids and cpu are threaded controllers). A fork bomb stops
at its pod's cap, and a spinner gets its pod's CPU share and cap, not the node's shared CPUs.

What cannot be bounded per pod: memory. It is a domain controller, and in a threaded subtree a
process's memory is charged to the threaded domain, `<root>`. So the node-wide `memory.max`
and `pids.max` go on `<root>` (controller options), and a process swept out of a pod's
container cgroup is made the OOM killer's first choice (pinning.SWEPT_OOM_SCORE_ADJ), so that
when `<root>` is full it goes before any tenant's QEMU.
"""

from __future__ import annotations

import attrs

from runner.log import log
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.node.layout import Layout

CONTROLLERS = ("cpu", "pids")  # threaded: they reach below float
PERIOD_US = 100_000  # cpu.max's default period
POD_PIDS_MAX = 1024  # tasks: QEMU's threads, virtiofsd's pool, the runner's, with room
POD_CPUS = 1.0  # a pod's helpers together, at most one CPU's time unless told otherwise


@attrs.frozen
class FloatLimits:
    """One pod's bound in float: tasks (processes and threads) and CPUs (None: no cap)."""

    pids_max: int | None = POD_PIDS_MAX
    cpus: float | None = POD_CPUS


@attrs.frozen
class RootLimits:
    """The node-wide bound on `<root>` (float and every pod's part of it); None: unset."""

    pids_max: int | None = None
    memory_max: int | None = None


def cpu_max(cpus: float | None) -> str:
    """cpu.max for a cap of `cpus` CPUs ("max" for none)."""
    if cpus is None:
        return f"max {PERIOD_US}"
    return f"{max(1000, round(cpus * PERIOD_US))} {PERIOD_US}"


def enable(cg: CgroupFS, layout: Layout) -> tuple[str, ...]:
    """cpu and pids enabled from `<root>`'s parent down to float, where the kernel offers
    them; returns those float's children get. A missing one is named in one warning: its
    bound is then not kept."""
    parent = layout.root.rsplit("/", 1)[0] or "/"
    # cpuset too: a pod's part shows float's CPUs as its own effective ones.
    cg.enable(layout.float, "cpuset")
    got = []
    for controller in CONTROLLERS:
        try:
            for where in (parent, layout.root, layout.float):
                cg.enable(where, controller)
            got.append(controller)
        except CgroupError as e:
            log.warning(
                "float-bound-unavailable",
                controller=controller,
                error=str(e),
                detail=f"pods' parts of float get no {controller} bound",
            )
    return tuple(got)


def bound_root(cg: CgroupFS, layout: Layout, limits: RootLimits) -> None:
    """The node-wide bounds asked for, on `<root>` (its parent must offer the controller)."""
    parent = layout.root.rsplit("/", 1)[0] or "/"
    for controller, value in (("pids", limits.pids_max), ("memory", limits.memory_max)):
        if value is not None:
            cg.enable(parent, controller)
            cg.write(layout.root, f"{controller}.max", str(value))


def make(cg: CgroupFS, layout: Layout, uuid: str, limits: FloatLimits) -> str:
    """The pod's part of float, made (or kept) with its bounds; its path."""
    path = layout.float_of(uuid)
    cg.make_threaded(path, None, frozenset())  # float's CPUs are its own
    if (cg.dir(path) / "pids.max").exists():
        cg.write(path, "pids.max", "max" if limits.pids_max is None else str(limits.pids_max))
    if (cg.dir(path) / "cpu.max").exists():
        cg.write(path, "cpu.max", cpu_max(limits.cpus))
    return path


async def remove(cg: CgroupFS, path: str, attempts: int = 2) -> bool:
    """The pod's part of float, once nothing of the pod is left in it (its processes end with
    the pod's PID namespace); False while it is still in use (the float keeper tries again)."""
    try:
        # EBUSY while populated (tasks still exiting count): retried briefly, then left.
        await cg.remove(path, attempts=attempts, delay=0.05)
    except CgroupError:
        return False
    return True
