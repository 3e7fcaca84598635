"""The writes an unprivileged VM pod cannot make, made for it: its processes moved between its
container cgroup and float, its vCPU threads placed, and kept placed while QEMU lives.

A pod names processes and threads as it sees them, in its own PID namespace. Each is looked up
among that pod's processes alone (same PID namespace, in its container cgroup or in float), and
every write is bracketed: a pidfd is opened before the identity is checked, and the process
must still be alive after the write. A live process keeps its PID, so the write reached the
process that was checked. A thread must still be there with the same start time.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs
import trio

from runner import cpus, kube, rpc
from runner.controller.guard import describe, guarded
from runner.controller.identity import pid_namespace
from runner.log import log
from runner.node import bracket, procfs
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.node.layout import Instance, Layout
from runner.node.pinning import Keeper, PinError, move_to_float, place_vcpu, undo_move, unplace
from runner.plan import Placed
from runner.run.metrics import Kept


@attrs.define
class Tenant:
    """A registered pod: its container cgroup and its PID namespace, and once its vCPUs are
    placed, the keeper that holds them so. The namespace is held open (`ns_fd`): while it is,
    the kernel cannot give its inode number to another namespace, so `ns` names this pod's
    alone."""

    uuid: str
    container: str
    ns: int
    ns_fd: int = -1
    keeper: Keeper | None = None
    scope: trio.CancelScope | None = None

    def stop_keeping(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        self.keeper, self.scope = None, None

    def release(self) -> None:
        """Forgotten: no keeping, the namespace let go."""
        self.stop_keeping()
        if self.ns_fd >= 0:
            os.close(self.ns_fd)
            self.ns_fd = -1


def hold_namespace(pid: int, ns: int) -> int:
    """An fd of process `pid`'s PID namespace, which must be the one numbered `ns` (read
    earlier, under a pidfd): OSError if the process is gone or not of it."""
    fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    if os.fstat(fd).st_ino != ns:
        os.close(fd)
        raise ProcessLookupError(f"process {pid} is not of PID namespace {ns}")
    return fd


def ns_pid(path: str) -> int | None:
    """The innermost PID in a /proc/<pid> or /proc/<pid>/task/<tid> status (NSpid)."""
    try:
        status = procfs.parse_status(procfs.read(Path(path, "status")))
    except OSError:
        return None
    ids = status.get("NSpid", "").split()
    return int(ids[-1]) if ids else None


def in_namespace(pid: int, ns: int) -> bool:
    return pid_namespace(pid) == ns


def find_process(ns: int, pid: int, candidates: Iterable[int]) -> int | None:
    """The node's PID of the process that the pod sees as `pid`, among `candidates`."""
    for host in candidates:
        if in_namespace(host, ns) and ns_pid(f"/proc/{host}") == pid:
            return host
    return None


def find_thread(host_pid: int, tid: int) -> int | None:
    for host_tid in procfs.threads(host_pid):
        if ns_pid(f"/proc/{host_pid}/task/{host_tid}") == tid:
            return host_tid
    return None


def float_processes(cg: CgroupFS, float_cg: str) -> set[int]:
    """float is threaded: its cgroup.procs cannot be read, its threads name their processes."""
    found: set[int] = set()
    if not cg.exists(float_cg):
        return found
    for tid in cg.threads(float_cg):
        with contextlib.suppress(OSError, KeyError, ValueError):
            found.add(procfs.tgid(tid))
    return found


def _pod_uid(cgroup: str) -> str | None:
    try:
        return kube.parse_pod_cgroup(cgroup).pod_uid
    except ValueError:
        return None


def _placed(qemu: int, tid: int, max_priority: int) -> Placed:
    """A vCPU thread as it runs now: its index from its name (QEMU's "CPU <n>/KVM"), its one
    CPU, its FIFO priority if it has one (never above the node's cap: the keeper then puts
    a thread raised behind the controller's back down to it)."""
    st = procfs.stat(qemu, tid)
    match = re.match(r"CPU (\d+)/", st.comm)
    allowed = os.sched_getaffinity(tid)
    if match is None or len(allowed) != 1:
        raise ValueError(f"thread {tid} ({st.comm}) is not a placed vCPU")
    priority = min(st.rt_priority, max_priority) if st.policy == "fifo" else 0
    return Placed(int(match.group(1)), tid, min(allowed), priority)


def refuse(message: str) -> rpc.RPCError:
    return rpc.RPCError(rpc.FORBIDDEN, message)


class Tenants:
    """Every write an unprivileged pod asks for."""

    def __init__(
        self,
        cg: CgroupFS,
        layout: Layout,
        max_priority: int = 1,
        pod_float: Callable[[str], str] | None = None,
    ) -> None:
        self.cg = cg
        self.layout = layout
        self.max_priority = max_priority
        # The pod's part of float, made if need be (the service's, with the node's bounds).
        self.pod_float = pod_float or layout.float_of
        self.by_uuid: dict[str, Tenant] = {}

    def book(self, uuid: str, container: str, pid: int, ns: int) -> Tenant:
        """A registration (first or again) made by process `pid` of namespace `ns` in
        `container`: the record is made, or refreshed with what the pod says now (a restarted
        container has a new namespace); a placed pod's keeper keeps on."""
        fd = hold_namespace(pid, ns)
        t = self.by_uuid.get(uuid)
        if t is None:
            t = self.by_uuid[uuid] = Tenant(uuid, container, ns, fd)
            return t
        if t.ns_fd >= 0:
            os.close(t.ns_fd)
        if (t.container, t.ns) != (container, ns):
            log.info("tenant-refreshed", uuid=uuid, container=container, was=t.container)
        t.container, t.ns, t.ns_fd = container, ns, fd
        if t.keeper is not None:
            t.keeper.container = container
        return t

    def forget(self, uuid: str) -> None:
        t = self.by_uuid.pop(uuid, None)
        if t is not None:
            t.release()

    def kept(self) -> list[Kept]:
        """What each pod's keeper did, for /metrics."""
        return [
            ([uuid], k.counts())
            for uuid, t in sorted(self.by_uuid.items())
            if (k := t.keeper) is not None
        ]

    def resolve(self, t: Tenant, pid: int, where: str) -> int:
        candidates = (
            self.cg.procs(t.container)
            if where == "container"
            else float_processes(self.cg, self.layout.float_of(t.uuid))
            | float_processes(self.cg, self.layout.float)  # placed before float was per pod
        )
        host = find_process(t.ns, pid, candidates)
        if host is None:
            raise refuse(f"pid {pid} is no process of pod {t.uuid} in its {where} cgroup")
        return host

    def is_its(self, t: Tenant, host: int, pid: int) -> Callable[[], bool]:
        """The check made under a bracket: node PID `host` is the pod's process `pid`."""
        return lambda: in_namespace(host, t.ns) and ns_pid(f"/proc/{host}") == pid

    def hold(self, t: Tenant, host: int, pid: int) -> int:
        """A pidfd of the process, and its identity checked again under it: while the pidfd
        shows it alive, what was read of /proc/<host> was this process's."""
        try:
            pidfd = os.pidfd_open(host)
        except OSError:
            raise refuse(f"pid {pid} of pod {t.uuid} went away") from None
        if not self.is_its(t, host, pid)() or procfs.exited(pidfd):
            os.close(pidfd)
            raise refuse(f"pid {pid} of pod {t.uuid} went away")
        return pidfd

    def move(self, t: Tenant, pid: int, to: str) -> None:
        """One whole process of the pod between its container cgroup and float, bracketed."""
        source = "float" if to == "container" else "container"
        host = self.resolve(t, pid, source)
        is_its = self.is_its(t, host, pid)
        try:
            if to == "float":
                to_cg = self.pod_float(t.uuid)
                move_to_float(self.cg, to_cg, self.cg.cpus(to_cg), host, is_its)
            else:
                try:
                    with bracket.process(host, is_its):
                        self.cg.move_process(t.container, host)
                except bracket.Raced:
                    undo_move(self.cg, host)
                    raise
        except bracket.Gone:
            raise refuse(f"pid {pid} of pod {t.uuid} went away") from None
        except bracket.Raced:
            log.error("tenant-move-raced", uuid=t.uuid, pid=pid, host_pid=host, to=to)
            raise refuse(f"pid {pid} of pod {t.uuid} exited during the move") from None
        except CgroupError as e:
            raise rpc.RPCError(rpc.INTERNAL_ERROR, str(e)) from None
        if to == "container" and t.keeper is not None:
            t.keeper.anchor_pid = lambda: host  # a new anchor: the only one let stay
        log.info("tenant-process-moved", uuid=t.uuid, pid=pid, host_pid=host, to=to)

    def place(self, t: Tenant, p: rpc.PlaceParams, instance: str) -> tuple[Keeper, int]:
        """QEMU to float, each vCPU thread into the instance cgroup on its CPU (and FIFO),
        read back; the keeper that holds them so, and QEMU's pidfd (its end ends the keeping).
        Every write is bracketed; if any fails or races, every vCPU written so far is put
        back as a helper (float, float's CPUs, not realtime) before the refusal."""
        qemu = self.resolve_anywhere(t, p.qemu)
        anchor = self.resolve(t, p.anchor, "container")
        pidfd = self.hold(t, qemu, p.qemu)
        written: list[Placed] = []
        starts: dict[int, int | None] = {}
        try:
            placed = []
            for v in p.vcpus:
                tid = find_thread(qemu, v.tid)
                if tid is None:
                    raise refuse(f"thread {v.tid} is no thread of pod {t.uuid}'s process {p.qemu}")
                placed.append(Placed(v.vcpu, tid, v.cpu, v.priority))
            starts = {q.tid: procfs.start_time(qemu, q.tid) for q in placed}
            float_cg = self.pod_float(t.uuid)
            float_cpus = self.cg.cpus(float_cg)
            move_to_float(self.cg, float_cg, float_cpus, qemu, self.is_its(t, qemu, p.qemu))
            for q in placed:
                written.append(q)
                place_vcpu(self.cg, instance, float_cg, qemu, q, starts[q.tid])
            if procfs.exited(pidfd) or any(
                procfs.start_time(qemu, q.tid) != starts[q.tid] for q in placed
            ):
                log.error("tenant-place-raced", uuid=t.uuid, qemu=p.qemu, host_pid=qemu)
                raise refuse(f"process {p.qemu} of pod {t.uuid} or a vCPU thread exited")
        except BaseException as e:
            self._unplace(t.uuid, qemu, written, starts)
            os.close(pidfd)
            if isinstance(e, bracket.Gone | bracket.Raced):
                raise refuse(f"process {p.qemu} of pod {t.uuid} or a vCPU thread exited") from None
            if isinstance(e, PinError | CgroupError):
                raise rpc.RPCError(rpc.INTERNAL_ERROR, str(e)) from None
            raise
        keeper = Keeper(self.cg, t.container, instance, float_cg, qemu, placed, lambda: anchor)
        log.info(
            "tenant-vcpus-placed",
            uuid=t.uuid,
            qemu=p.qemu,
            host_pid=qemu,
            placement={q.vcpu: q.cpu for q in placed},
            cpus=cpus.format({q.cpu for q in placed}),
        )
        return keeper, pidfd

    def adopt(self, instances: Mapping[str, Instance]) -> list[tuple[Tenant, Keeper, int]]:
        """After a restart: each instance with vCPU threads becomes a tenant again, found from
        the threads themselves (their process's PID namespace, the process of that namespace
        still in the pod's container cgroup: the anchor), with the keepers to start."""
        found = []
        for uuid, inst in sorted(instances.items()):
            if uuid in self.by_uuid:
                continue
            try:
                if inst.threads:
                    found.append(self._adopt(uuid, inst))
                else:
                    self._adopt_registered(uuid, inst)
            except Exception as e:  # one pod's odd state never stops a restart
                log.warning("tenant-not-adopted", uuid=uuid, error=describe(e))
        return found

    def _adopt(self, uuid: str, inst: Instance) -> tuple[Tenant, Keeper, int]:
        tids = self.cg.threads(inst.path)
        qemu = procfs.tgid(tids[0])
        ns = procfs.pid_namespace(qemu)
        pidfd = os.pidfd_open(qemu)
        try:
            anchor, container = next(
                (pid, cg)
                for pid in procfs.processes()
                if in_namespace(pid, ns) and (cg := procfs.cgroup(pid)) and _pod_uid(cg) == uuid
            )
            placed = [_placed(qemu, tid, self.max_priority) for tid in tids]
            if procfs.exited(pidfd):
                raise ProcessLookupError(f"QEMU ({qemu}) exited")
            t = self.book(uuid, container, qemu, ns)
        except BaseException:
            os.close(pidfd)
            raise
        keeper = Keeper(
            self.cg, container, inst.path, self.pod_float(uuid), qemu, placed, lambda: anchor
        )
        t.keeper = keeper
        log.info("tenant-adopted", uuid=uuid, host_pid=qemu, vcpus=len(placed), container=container)
        return t, keeper, pidfd

    def _adopt_registered(self, uuid: str, inst: Instance) -> None:
        """A pod that registered and has not placed its vCPUs yet (the controller restarted in
        between): its VM container is the pod's container cgroup on the instance's CPUs, and
        its namespace the one every process there shares."""
        members: dict[str, list[int]] = {}
        for pid in procfs.processes():
            with contextlib.suppress(OSError):
                cg = procfs.cgroup(pid)
                if cg and _pod_uid(cg) == uuid:
                    members.setdefault(cg, []).append(pid)
        containers = [
            cg
            for cg in members
            if self._cpus_of(cg) == inst.cpus and not cg.startswith(self.layout.root + "/")
        ]
        if len(containers) != 1:
            raise LookupError(f"{len(containers)} containers of pod {uuid} on its CPUs")
        (container,) = containers
        namespaces = {procfs.pid_namespace(pid) for pid in members[container]}
        if len(namespaces) != 1:
            raise LookupError(f"{len(namespaces)} PID namespaces in {container}")
        (ns,) = namespaces
        self.book(uuid, container, members[container][0], ns)
        self.pod_float(uuid)
        log.info("tenant-adopted", uuid=uuid, vcpus=0, container=container)

    def _cpus_of(self, cgroup: str) -> frozenset[int] | None:
        try:
            return self.cg.cpus(cgroup, effective=False)
        except (CgroupError, ValueError):
            return None

    def _unplace(
        self, uuid: str, qemu: int, written: list[Placed], starts: Mapping[int, int | None]
    ) -> None:
        """A placement that failed half way: each vCPU written so far back as a helper, while
        its TID is still QEMU's thread."""
        for q in written:
            # Gone: not QEMU's thread any more, nothing to undo.
            with contextlib.suppress(OSError), bracket.thread(qemu, q.tid, starts.get(q.tid)):
                unplace(self.cg, self.layout.float_of(uuid), q.tid)

    def resolve_anywhere(self, t: Tenant, pid: int) -> int:
        try:
            return self.resolve(t, pid, "container")
        except rpc.RPCError:
            return self.resolve(t, pid, "float")


async def keep(
    t: Tenant, keeper: Keeper, pidfd: int, interval: float, failed: Callable[[str], None]
) -> None:
    """The pod's keeper, until QEMU exits (its pidfd turns readable) or the pod deregisters.
    A keeper that raises starts again after a backoff: it never ends another pod's."""
    with trio.CancelScope() as scope:
        t.keeper, t.scope = keeper, scope
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    guarded, f"keeper {t.uuid}", "keeper", lambda: keeper.keep(interval), failed
                )
                await trio.lowlevel.wait_readable(pidfd)
                nursery.cancel_scope.cancel()
        finally:
            os.close(pidfd)
    if t.scope is scope:
        t.keeper, t.scope = None, None
    log.info("tenant-keeping-ended", uuid=t.uuid)
