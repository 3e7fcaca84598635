"""Reads what `inspect` shows of a pod, from /proc and cgroupfs; `runner.podview` judges it.

Inside the pod, the runner's ready file names QEMU, the cgroups and each vCPU's thread and
CPU, and the pod is every process of this PID namespace. On the node, a pod starts from its
instance cgroup: the process its threads belong to is QEMU, and the pod is every process of
QEMU's PID namespace. Either way the processes those start (a sandboxed virtiofsd has a PID
namespace of its own) and anything written into the container cgroup count too. Threads and
processes vanish while they are read: they are skipped."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from runner import cpus, kube, podview, topology
from runner.cpus import CpuSet
from runner.node import procfs
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.node.layout import Layout
from runner.podview import Pod, Process


class ScanError(Exception):
    """Nothing to inspect, or no way to read it; the message is one line."""


class ProcessTable:
    """One pass over /proc: each process's PID namespace and parent."""

    def __init__(self) -> None:
        self.ns: dict[int, int] = {}
        self.ppid: dict[int, int] = {}
        self.denied: set[int] = set()  # another user's, and we are not root
        for pid in procfs.processes():
            try:
                self.ns[pid] = procfs.pid_namespace(pid)
                self.ppid[pid] = procfs.stat(pid).ppid
            except PermissionError:
                self.denied.add(pid)
            except OSError:
                self.ns.pop(pid, None)  # gone
        self.own_ns = procfs.pid_namespace("self")

    def notes(self) -> tuple[str, ...]:
        if not self.denied:
            return ()
        return (
            f"{len(self.denied)} processes could not be read (not root): the pod may have more",
        )

    def in_namespace(self, ns: int) -> set[int]:
        return {p for p, n in self.ns.items() if n == ns}

    def with_descendants(self, roots: Iterable[int]) -> set[int]:
        children: dict[int, list[int]] = {}
        for pid, parent in self.ppid.items():
            children.setdefault(parent, []).append(pid)
        found, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo += children.get(pid, [])
        return found


def read_processes(pids: Iterable[int], on_node: Callable[[str], str] = str) -> tuple[Process, ...]:
    """`on_node`: each thread's cgroup as the node names it, from how this process sees it."""
    out = []
    for pid in sorted(set(pids)):
        try:
            st = procfs.stat(pid)
            argv = tuple(procfs.cmdline(pid))
        except OSError:
            continue
        threads = []
        for tid in procfs.threads(pid):
            try:
                t = procfs.thread(pid, tid)
                threads.append(attrs.evolve(t, cgroup=on_node(t.cgroup)))
            except (OSError, KeyError, ValueError):
                continue
        if threads:
            out.append(Process(pid, st.ppid, st.comm, argv, tuple(threads)))
    return tuple(out)


def numa_nodes() -> tuple[dict[int, int], tuple[str, ...]]:
    """CPU -> NUMA node; a sysfs that cannot be read leaves the nodes blank, with a note."""
    try:
        host = topology.read_host()
    except (topology.TopologyError, OSError) as e:
        return {}, (f"NUMA nodes unknown: {e}",)
    return {c: cpu.node for c, cpu in host.cpus.items()}, ()


def read_ready(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScanError(f"{path} does not exist: the instance is not running (yet)") from None
    except (OSError, ValueError) as e:
        raise ScanError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict):
        raise ScanError(f"{path} is not a ready file")
    return doc


def _vcpus(ready: dict[str, Any]) -> tuple[dict[int, int], dict[int, int]]:
    """tid -> vCPU and vCPU -> CPU, from the ready file."""
    listed = ready.get("vcpus") or []
    return {v["tid"]: v["vcpu"] for v in listed}, {v["vcpu"]: v["cpu"] for v in listed}


def _try_cpus(cg: CgroupFS, cgroup: str) -> CpuSet | None:
    try:
        return cg.cpus(cgroup, effective=False)
    except (CgroupError, cpus.CpuListError):
        return None


def _try_threads(cg: CgroupFS, cgroup: str) -> frozenset[int] | None:
    try:
        return frozenset(cg.threads(cgroup))
    except CgroupError:
        return None


def with_container(
    pod: Pod, cg: CgroupFS, seen: Callable[[str], str] = str, on_node: Callable[[str], str] = str
) -> Pod:
    """Add what sits in the container cgroup but was not found by namespace: a process
    written there from outside. Those this namespace cannot see are listed as PID 0.
    `seen`/`on_node`: a node's cgroup path as our cgroupfs has it, and back."""
    anchor = podview.anchor_of(pod, podview.runner_of(pod))
    container = podview.container_of(pod, anchor)
    if container is None:
        return pod
    try:
        listed = cg.procs(seen(container))
    except CgroupError:
        return pod  # no cgroupfs here, or the scope is gone
    known = {p.pid for p in pod.processes}
    extra = read_processes((p for p in listed if p > 0 and p not in known), on_node)
    return attrs.evolve(
        pod,
        processes=pod.processes + extra,
        foreign_in_container=sum(1 for p in listed if p <= 0),
    )


# --- inside the pod ------------------------------------------------------------------------


def own_run_dir(base: str) -> Path | None:
    """Inside a VM pod: its runner's run dir, <base>/<pod uid>. The pod is read from this
    process's cgroup or, when the runner has swept it to float already, from the anchor's
    (only when /proc's PID 1 is the runner, so that /proc is the pod's own). In a cgroup
    namespace of its own the pod's cgroup is "/" and names no pod: then the one run dir
    under <base> with a ready file (the pod's /run holds its own runner's only). None on the
    node: no pod, or a pod without a ready file that is not the runner's (the controller's).
    Raises ScanError inside a VM pod whose run dir cannot be told."""
    uid = None
    try:
        uid = _pod_uid(procfs.cgroup_of(procfs.read("/proc/self/cgroup")))
        runner_is_init = procfs.stat(1).comm == podview.RUNNER_COMM
    except OSError:
        return None
    if uid is None and runner_is_init:
        for pid in procfs.processes():
            try:
                if tuple(procfs.cmdline(pid)) == podview.ANCHOR_ARGV:
                    uid = _pod_uid(procfs.thread(pid, pid).cgroup)
            except (OSError, KeyError, ValueError):
                continue
            if uid is not None:
                break
    if uid is None and runner_is_init:
        # A private cgroup namespace hides the pod's cgroup; the pod's own /run holds only
        # its own runner's run dir.
        found = [d for d in _subdirs(Path(base)) if (d / "ready").exists()]
        if len(found) != 1:
            raise ScanError(
                f"inside a VM pod, but {len(found)} ready files under {base}: the instance is "
                "not running yet" + (", or give --run-dir" if found else "")
            )
        return found[0]
    if uid is None:
        return None
    run_dir = Path(base) / uid
    return run_dir if runner_is_init or (run_dir / "ready").exists() else None


def _subdirs(path: Path) -> list[Path]:
    try:
        return [d for d in path.iterdir() if d.is_dir()]
    except OSError:
        return []


def _pod_uid(cgroup: str) -> str | None:
    try:
        return kube.parse_pod_cgroup(cgroup).pod_uid
    except kube.KubeError:
        return None


def in_pod(run_dir: Path, cg: CgroupFS) -> Pod:
    ready = read_ready(run_dir / "ready")
    instance, float_cg = ready.get("instance_cgroup"), ready.get("float_cgroup")
    if not instance:
        raise ScanError(f"{run_dir / 'ready'}: the instance runs with isolation off")
    table = ProcessTable()
    qemu = ready.get("qemu_pid")
    if not isinstance(qemu, int) or table.ns.get(qemu) != table.own_ns:
        raise ScanError(
            f"QEMU (PID {qemu} in {run_dir / 'ready'}) is not in this PID namespace's /proc: "
            "run inspect inside the pod (with the pod's /proc), or give --pod on the node"
        )
    # Every cgroup is shown as the node names it. The ready file has the runner's view, which
    # in a private cgroup namespace is relative to the root it names; /proc shows ours, the
    # same when we joined that namespace (kubectl exec does), and our cgroupfs is rooted there.
    root = ready.get("cgroup_namespace_root") or "/"
    ours = root if _same_cgroup_namespace(qemu) else "/"

    def on_node(path: str) -> str:
        return kube.on_node(path, ours)

    def seen(path: str) -> str:
        return kube.view(path, ours)

    instance = kube.on_node(instance, root)
    float_cg = kube.on_node(float_cg, root) if float_cg else None
    vcpu_tids, vcpu_cpus = _vcpus(ready)
    float_cpus = _try_cpus(cg, seen(float_cg)) if float_cg else None
    if float_cpus is None and ready.get("float_cpus"):
        float_cpus = cpus.parse(ready["float_cpus"])
    nodes, notes = numa_nodes()
    notes += table.notes()
    pids = table.with_descendants(table.in_namespace(table.own_ns))
    dedicated = _try_cpus(cg, seen(instance)) or frozenset()
    pod = Pod(
        uid=ready.get("pod_uid"),
        seen_from="pod",
        instance_cgroup=instance,
        float_cgroup=float_cg,
        float_cpus=float_cpus,
        dedicated=frozenset(vcpu_cpus.values()) | dedicated,
        qemu_pid=qemu,
        self_pid=os.getpid(),
        processes=read_processes(pids, on_node),
        instance_tids=_try_threads(cg, seen(instance)),
        vcpu_tids=vcpu_tids,
        vcpu_cpus=vcpu_cpus,
        nodes=nodes,
        notes=notes,
    )
    return with_container(pod, cg, seen, on_node)


def _same_cgroup_namespace(pid: int) -> bool:
    try:
        return os.stat("/proc/self/ns/cgroup").st_ino == os.stat(f"/proc/{pid}/ns/cgroup").st_ino
    except OSError:
        return False


# --- on the node ---------------------------------------------------------------------------


def on_node(
    layout: Layout,
    uid: str,
    ready_file: Path | None = None,
    table: ProcessTable | None = None,
    numa: tuple[dict[int, int], tuple[str, ...]] | None = None,
) -> Pod:
    """One pod, from its instance cgroup. `ready_file`, when it is this pod's, gives each
    vCPU's CPU (its PIDs are the pod's namespace's, and are not used)."""
    cg = layout.cg
    instance = layout.instance(uid)
    if not cg.exists(instance):
        raise ScanError(f"no instance cgroup for pod {uid} (no {cg.dir(instance)})")
    try:
        tids = cg.threads(instance)
        dedicated = cg.cpus(instance, effective=False)
    except (CgroupError, cpus.CpuListError) as e:
        raise ScanError(str(e)) from None
    table = table or ProcessTable()
    nodes, notes = numa or numa_nodes()
    qemu = _qemu(tids)
    if qemu in table.denied:
        raise ScanError(
            f"cannot read QEMU's PID namespace (PID {qemu}): permission denied (run as root)"
        )
    notes += table.notes()
    pids: set[int] = set()
    if qemu is None:
        notes += ("the instance cgroup holds no thread: its runner is starting, stopping or gone",)
    elif table.ns.get(qemu) == table.own_ns:
        # No PID namespace of its own (or we are inside it): the runner and what it started.
        pids = table.with_descendants([_runner(table, qemu)])
    elif qemu in table.ns:
        pids = table.with_descendants(table.in_namespace(table.ns[qemu]))
    vcpu_cpus: dict[int, int] = {}
    if ready_file is not None and ready_file.exists():
        try:
            ready = read_ready(ready_file)
        except ScanError as e:
            notes += (str(e),)
        else:
            if ready.get("pod_uid") == uid:
                vcpu_cpus = _vcpus(ready)[1]
    try:
        float_cpus = layout.float_cpus()
    except (CgroupError, cpus.CpuListError):
        float_cpus = None
    pod = Pod(
        uid=uid,
        seen_from="node",
        instance_cgroup=instance,
        float_cgroup=layout.float_of(uid),
        float_cpus=float_cpus,
        dedicated=dedicated,
        qemu_pid=qemu,
        self_pid=os.getpid() if os.getpid() in pids else None,
        processes=read_processes(pids),
        instance_tids=frozenset(tids),
        vcpu_cpus=vcpu_cpus,
        nodes=nodes,
        notes=notes,
    )
    return with_container(pod, cg)


def _qemu(tids: Iterable[int]) -> int | None:
    """The process the instance cgroup's threads belong to: QEMU by name if several."""
    owners = set()
    for tid in tids:
        try:
            owners.add(procfs.tgid(tid))
        except (OSError, KeyError, ValueError):
            continue
    for pid in sorted(owners):
        try:
            if procfs.stat(pid).comm.startswith("qemu-system"):
                return pid
        except OSError:
            continue
    return min(owners, default=None)


def _runner(table: ProcessTable, qemu: int) -> int:
    """QEMU's parent if it is the runner, else QEMU alone (orphaned to the node's init)."""
    parent = table.ppid.get(qemu, 0)
    try:
        return parent if procfs.stat(parent).comm == podview.RUNNER_COMM else qemu
    except OSError:
        return qemu


def all_on_node(layout: Layout, run_dir_base: str) -> list[Pod]:
    """Every instance under the root; one that goes away while it is read is left out."""
    if not layout.cg.exists(layout.root):
        raise ScanError(
            f"{layout.cg.dir(layout.root)} does not exist: no instance has run on this node "
            "(or --cgroup-root is not where they are)"
        )
    uids = sorted(layout.instances())
    if not uids:
        raise ScanError(f"no instance cgroup under {layout.cg.dir(layout.root)}")
    table, numa = ProcessTable(), numa_nodes()
    pods = []
    for uid in uids:
        try:
            pods.append(on_node(layout, uid, Path(run_dir_base) / uid / "ready", table, numa))
        except ScanError:
            if layout.cg.exists(layout.instance(uid)):
                raise
    return pods
