"""Placing vCPU threads and keeping them placed: each in the instance cgroup on its own CPU,
and nothing else of the pod on the dedicated CPUs (processes exec'd into the container,
probes, `kubectl exec`, land in the container cgroup and go to float). The runner does it in
embedded mode; the node controller does it for an unprivileged pod, with the same code on the
node's PIDs."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from runner import cpus
from runner.log import log
from runner.node import bracket, procfs
from runner.node.cgroupfs import CgroupError, CgroupFS, thread_cgroup
from runner.plan import Placed, in_place, sched_as_planned

# What a process swept out of a pod's container cgroup is to the OOM killer: the first to go
# when <root> is full (podfloat.py), before any tenant's QEMU.
SWEPT_OOM_SCORE_ADJ = 1000


class PinError(Exception):
    """A vCPU could not be placed, or did not stay placed; one line."""


def place_vcpu(
    cg: CgroupFS,
    instance_cg: str,
    float_cg: str,
    qemu_pid: int,
    p: Placed,
    started: int | None = None,
) -> None:
    """One vCPU thread into the instance cgroup, onto its CPU, and read back; all of it while
    the TID is provably QEMU's thread (started at `started`, when known). A thread that went
    away meanwhile gets nothing, and one that went away during the writes has them undone."""
    try:
        with bracket.thread(qemu_pid, p.tid, started):
            # Cgroup first, then affinity: on 6.1 a cpuset move resets the affinity.
            cg.move_thread(instance_cg, p.tid)
            os.sched_setaffinity(p.tid, {p.cpu})
            check_placed(instance_cg, qemu_pid, p, sched=False)
            if p.priority:
                make_realtime(p)
    except bracket.Raced as e:
        unplace(cg, float_cg, p.tid)
        raise PinError(f"vCPU {p.vcpu} (thread {p.tid}): {e}; its writes undone") from None
    except (CgroupError, OSError) as e:
        raise PinError(f"cannot pin vCPU {p.vcpu} (thread {p.tid}) to CPU {p.cpu}: {e}") from None


def unplace(cg: CgroupFS, float_cg: str, tid: int) -> None:
    """A thread that is no (longer a) placed vCPU back as any helper is: in float, on float's
    CPUs, not realtime. Best effort: it may be gone."""
    with contextlib.suppress(CgroupError, OSError):
        cg.move_thread(float_cg, tid)
    with contextlib.suppress(CgroupError, OSError):
        os.sched_setaffinity(tid, cg.cpus(float_cg))
    with contextlib.suppress(OSError):
        if os.sched_getscheduler(tid) in (os.SCHED_FIFO, os.SCHED_RR):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    log.warning("vcpu-unplaced", tid=tid)


def check_placed(instance_cg: str, qemu_pid: int, p: Placed, sched: bool = True) -> None:
    """The vCPU thread is in the instance cgroup, allowed on its CPU alone (and, `sched`,
    SCHED_FIFO at its priority if realtime), as read from /proc now."""
    try:
        in_cgroup = thread_cgroup(qemu_pid, p.tid)
        allowed = os.sched_getaffinity(p.tid)
        policy = os.sched_getscheduler(p.tid) if p.priority and sched else 0
        priority = os.sched_getparam(p.tid).sched_priority if p.priority and sched else 0
    except (CgroupError, OSError) as e:
        raise PinError(f"cannot read vCPU {p.vcpu} (thread {p.tid}) back: {e}") from None
    if not in_place(in_cgroup, allowed, instance_cg, p.cpu):
        raise PinError(
            f"vCPU {p.vcpu} (thread {p.tid}) did not stay pinned: "
            f"cgroup {in_cgroup}, CPUs {cpus.format(allowed)}"
        )
    if sched and p.priority and not sched_as_planned(p, policy, priority):
        raise PinError(
            f"vCPU {p.vcpu} (thread {p.tid}) did not stay SCHED_FIFO {p.priority}: "
            f"policy {policy}, priority {priority}"
        )


def make_realtime(p: Placed) -> None:
    """SCHED_FIFO once the vCPU is alone on its CPU, never before: a realtime thread on
    shared CPUs starves them."""
    try:
        os.sched_setscheduler(p.tid, os.SCHED_FIFO, os.sched_param(p.priority))
        policy, priority = os.sched_getscheduler(p.tid), os.sched_getparam(p.tid).sched_priority
    except OSError as e:
        why = e.strerror
        if e.errno == errno.EPERM:
            # __sched_setscheduler: a task group with no RT runtime refuses RT policies.
            why = (
                "EPERM: with CONFIG_RT_GROUP_SCHED a cgroup gets no realtime runtime, and "
                "cgroup v2 cannot grant it (cgroup-v2.rst: the cpu controller can only be "
                "enabled when all RT processes are in the root cgroup)"
            )
        raise PinError(
            f"cannot make vCPU {p.vcpu} (thread {p.tid}) SCHED_FIFO {p.priority}: {why}"
        ) from None
    if not sched_as_planned(p, policy, priority):
        raise PinError(
            f"vCPU {p.vcpu} (thread {p.tid}) did not stay SCHED_FIFO {p.priority}: "
            f"policy {policy}, priority {priority}"
        )


def move_to_float(
    cg: CgroupFS,
    float_cg: str,
    float_cpus: cpus.CpuSet,
    pid: int,
    check: Callable[[], bool] = lambda: True,
    oom_score_adj: int | None = None,
) -> None:
    """A whole process into float, every thread of it allowed on float's CPUs; each write
    while the PID (TID) provably is the process `check` approved (bracket.py). Gone: nothing
    written; Raced: the cgroup move undone, then raised. `oom_score_adj`: what the OOM killer
    should think of it from now on (a process swept out of a pod: first to go)."""
    try:
        with bracket.process(pid, check):
            cg.move_process(float_cg, pid)
            if oom_score_adj is not None:
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/oom_score_adj").write_text(str(oom_score_adj))
    except bracket.Raced:
        undo_move(cg, pid)
        raise
    for task in procfs.threads(pid):
        # Threads come and go: Gone and Raced are OSErrors.
        with contextlib.suppress(OSError), bracket.thread(pid, task):
            os.sched_setaffinity(task, float_cpus)


def undo_move(cg: CgroupFS, pid: int) -> None:
    """A process moved by a write that raced with the exit of the one checked: whoever holds
    the PID now goes back to where a new process starts, its parent's cgroup."""
    where = bracket.parent_cgroup(pid)
    if where is not None:
        with contextlib.suppress(CgroupError):
            cg.move_process(where, pid)
    log.error("write-raced", pid=pid, undone_to=where)


@attrs.frozen
class KeptCounts:
    """What keeping an instance's vCPUs placed has done (by one keeper, since it started)."""

    drifts: int = 0
    repins: int = 0
    moved_to_float: int = 0  # processes, out of the container cgroup
    evicted: int = 0  # threads that were no vCPU, out of the instance cgroup


class Keeper:
    """Continuous verification while the guest runs."""

    def __init__(
        self,
        cg: CgroupFS,
        container: str,
        instance_cg: str,
        float_cg: str,
        qemu_pid: int,
        placed: list[Placed],
        anchor_pid: Callable[[], int],
    ) -> None:
        self.cg = cg
        self.container = container
        self.instance_cg = instance_cg
        self.float_cg = float_cg
        self.qemu_pid = qemu_pid
        self.placed = placed
        self.anchor_pid = anchor_pid
        # Each vCPU thread's start: a TID that names another thread later is not repinned.
        self.started = {p.tid: procfs.start_time(qemu_pid, p.tid) for p in placed}
        self.repins = 0
        self.drifts = 0
        self.moved_to_float = 0  # processes out of the container cgroup
        self.evicted = 0  # threads out of the instance cgroup that were no vCPU
        self.last_round = time.monotonic()  # when a round of checks last finished
        self._failing: str | None = None

    def counts(self) -> KeptCounts:
        return KeptCounts(self.drifts, self.repins, self.moved_to_float, self.evicted)

    async def keep(self, interval: float) -> None:
        if interval <= 0 or not self.placed:
            return
        while True:
            await trio.sleep(interval)
            try:
                self.check_vcpus()
                self.sweep_instance()
                self.sweep_container()
            except (CgroupError, OSError) as e:
                if not Path(f"/proc/{self.qemu_pid}").exists():
                    return  # QEMU is going away: its own watcher says so
                if str(e) != self._failing:  # once per kind of failure, not every second
                    log.error("verify-failed", error=str(e), detail="retrying")
                self._failing = str(e)
            else:
                if self._failing is not None:
                    log.info("verify-recovered")
                self._failing = None
            self.last_round = time.monotonic()

    def check_vcpus(self) -> None:
        """A vCPU moved to another cgroup or CPU behind our back (taskset, a stray cgroup
        write, the kernel resetting affinity when a cpuset is rewritten, chrt on a realtime
        vCPU) is put back."""
        for p in self.placed:
            in_cgroup = thread_cgroup(self.qemu_pid, p.tid)
            allowed = os.sched_getaffinity(p.tid)
            policy = os.sched_getscheduler(p.tid) if p.priority else 0
            priority = os.sched_getparam(p.tid).sched_priority if p.priority else 0
            if in_place(in_cgroup, allowed, self.instance_cg, p.cpu) and sched_as_planned(
                p, policy, priority
            ):
                continue
            self.drifts += 1
            log.warning(
                "vcpu-drifted",
                vcpu=p.vcpu,
                tid=p.tid,
                cpu=p.cpu,
                cgroup=in_cgroup,
                cpus=cpus.format(allowed),
                **({"policy": policy, "priority": priority} if p.priority else {}),
            )
            try:
                place_vcpu(
                    self.cg,
                    self.instance_cg,
                    self.float_cg,
                    self.qemu_pid,
                    p,
                    self.started.get(p.tid),
                )
            except PinError as e:
                log.error("vcpu-repin-failed", vcpu=p.vcpu, tid=p.tid, error=str(e))
            else:
                self.repins += 1
                log.warning("vcpu-repinned", vcpu=p.vcpu, tid=p.tid, cpu=p.cpu)

    def sweep_instance(self) -> None:
        """The instance cgroup is for the vCPUs alone: any other thread written there (by
        hand, by a tool that moves a whole thread group) shares their CPUs. It goes to float.
        A thread shown as 0 is outside our PID namespace: not ours to move, inspect marks it."""
        vcpus = {p.tid for p in self.placed}
        strays = [t for t in self.cg.threads(self.instance_cg) if t > 0 and t not in vcpus]
        if not strays:
            return
        float_cpus = self.cg.cpus(self.float_cg)
        for tid in strays:
            try:
                pid = procfs.tgid(tid)
                with bracket.thread(pid, tid, check=self._in_instance(pid, tid)):
                    self.cg.move_thread(self.float_cg, tid)
                    os.sched_setaffinity(tid, float_cpus)
            except bracket.Raced:
                unplace(self.cg, self.float_cg, tid)
                continue
            except (CgroupError, OSError, KeyError, ValueError) as e:
                if Path(f"/proc/{self.qemu_pid}/task/{tid}").exists():
                    log.warning("instance-evict-failed", tid=tid, error=str(e))
                continue
            self.evicted += 1
            log.warning(
                "thread-evicted",
                tid=tid,
                detail="a thread that is no vCPU was in the instance cgroup, on the vCPUs' CPUs",
            )

    def _in_instance(self, pid: int, tid: int) -> Callable[[], bool]:
        return lambda: thread_cgroup(pid, tid) == self.instance_cg

    def _in_container(self, pid: int) -> Callable[[], bool]:
        return lambda: procfs.cgroup(pid) == self.container and not procfs.stat(pid).kernel

    def sweep_container(self) -> None:
        """Anything in the container cgroup but the anchor shares the dedicated CPUs with
        the vCPUs: exec'd processes and probes join it. They go to float."""
        if not self.cg.exists(self.container):
            return  # the scope went with the anchor: nothing can join it
        float_cpus = self.cg.cpus(self.float_cg)
        anchor = self.anchor_pid()
        for pid in self.cg.procs(self.container):
            if pid == anchor or pid <= 0:  # 0: outside our pid namespace, not the pod's
                continue
            try:
                st = procfs.stat(pid)
                if st.kernel:
                    continue  # KVM's workers: the controller's kernel-thread sweep moves them
                move_to_float(
                    self.cg,
                    self.float_cg,
                    float_cpus,
                    pid,
                    self._in_container(pid),
                    SWEPT_OOM_SCORE_ADJ,
                )
            except bracket.Raced:
                continue  # undone and logged
            except (CgroupError, OSError) as e:
                if Path(f"/proc/{pid}").exists():
                    log.warning("exec-move-failed", pid=pid, error=str(e))
                continue  # gone already
            self.moved_to_float += 1
            log.warning(
                "exec-moved-to-float",
                pid=pid,
                comm=st.comm,
                detail="a process joined the container cgroup (exec, probe) and would "
                "have shared the vCPUs' CPUs",
            )
