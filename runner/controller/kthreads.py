"""KVM's workers out of a VM pod's container cgroup. kvm-nx-lpage-recovery (kernels up to
6.12) is a kernel thread that the kernel attaches to the cgroups of the process that made the
VM: QEMU, in the container cgroup at that moment, on the dedicated CPUs. The runner cannot see
it from the pod's PID namespace (it shows as PID 0 there); the controller moves it to float,
where the kernel lets it (not a thread bound to a CPU, PF_NO_SETAFFINITY: EINVAL)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from runner import cpus
from runner.log import log
from runner.node import bracket, procfs
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.node.layout import Layout
from runner.node.pinning import undo_move


def sweep(cg: CgroupFS, layout: Layout, uuid: str, container: str, kept: set[int]) -> int:
    """Every movable kernel thread of `container` to float; returns how many moved. `kept`:
    those the kernel would not let go, tried once and remembered."""
    try:
        listed = cg.procs(container)
        float_cpus = layout.float_cpus()
    except (CgroupError, cpus.CpuListError):
        return 0  # the scope is gone with its pod
    moved = 0
    for pid in listed:
        if pid in kept:
            continue
        try:
            st = procfs.stat(pid)
        except OSError:
            continue
        if not st.kernel:
            continue  # a process of the pod: the runner's, or the pod's keeper's, to sweep
        try:
            with bracket.process(pid, _still(pid, container)):
                cg.move_process(layout.float_of(uuid), pid)
                if float_cpus:
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(pid, float_cpus)
        except bracket.Raced:
            undo_move(cg, pid)
            continue
        except bracket.Gone:
            continue
        except (CgroupError, OSError) as e:
            kept.add(pid)
            log.warning("kernel-thread-kept", pid=pid, comm=st.comm, uuid=uuid, error=str(e))
            continue
        moved += 1
        log.info(
            "kernel-thread-moved",
            pid=pid,
            comm=st.comm,
            uuid=uuid,
            detail="a kernel thread in the pod's container cgroup, on its dedicated CPUs",
        )
    return moved


def _still(pid: int, container: str) -> Callable[[], bool]:
    """Checked under the bracket: still a kernel thread in the pod's container cgroup."""
    return lambda: procfs.stat(pid).kernel and procfs.cgroup(pid) == container
