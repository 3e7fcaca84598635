"""What `instance-runner inspect` decides about one pod: each thread's role, the pinning
invariants it breaks, and the two ways of showing it (a table for people, JSON for scripts).
Pure: the facts come from `runner.node.podscan`.

The invariants are the runner's promise: each vCPU alone in the instance cgroup on its own
CPU; nothing else of the pod on a dedicated CPU; nothing but vCPUs in the instance cgroup;
nothing but the anchor in the container cgroup (processes exec'd into the pod land there,
on the dedicated CPUs, until the runner sweeps them to float)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from runner import cpus, kube
from runner.cpus import CpuSet
from runner.node.procfs import ThreadView, printable

Role = Literal["vcpu", "qemu-main", "io-thread", "helper", "runner", "anchor", "inspect", "other"]

# QEMU with debug-threads=on names a vCPU thread "CPU <n>/<accelerator>".
_VCPU_NAME = re.compile(r"^CPU (\d+)/\w+$")
RUNNER_COMM = "instance-runner"
HELPERS = ("dnsmasq", "virtiofsd")
ANCHOR_ARGV = ("sleep", "infinity")


@attrs.frozen
class Process:
    pid: int
    ppid: int
    comm: str
    cmdline: tuple[str, ...]
    threads: tuple[ThreadView, ...]


@attrs.frozen
class Pod:
    """Everything read about one pod, as the reader's PID namespace numbers it."""

    uid: str | None
    seen_from: Literal["pod", "node"]
    instance_cgroup: str
    float_cgroup: str | None
    float_cpus: CpuSet | None
    dedicated: CpuSet  # the instance's CPUs: only its vCPUs may run there
    qemu_pid: int | None
    self_pid: int | None  # the inspecting process, when it is among the pod's
    processes: tuple[Process, ...]
    instance_tids: frozenset[int] | None = None  # the instance cgroup's threads, if readable
    vcpu_tids: Mapping[int, int] = attrs.field(factory=dict)  # tid -> vCPU (the ready file)
    vcpu_cpus: Mapping[int, int] = attrs.field(factory=dict)  # vCPU -> its CPU (ready file)
    nodes: Mapping[int, int] = attrs.field(factory=dict)  # CPU -> NUMA node; {}: unknown
    foreign_in_container: int = 0  # processes there that this PID namespace cannot see
    notes: tuple[str, ...] = ()


@attrs.frozen
class Row:
    thread: ThreadView
    process: str  # the comm of its process
    role: Role
    vcpu: int | None
    node: int | None
    problems: tuple[str, ...]


@attrs.frozen
class Report:
    pod: Pod
    container_cgroup: str | None
    runner_pid: int | None
    anchor_pid: int | None
    rows: tuple[Row, ...]
    problems: tuple[str, ...]  # of the pod as a whole, not of one thread

    @property
    def ok(self) -> bool:
        return not self.problems and not any(r.problems for r in self.rows)

    def all_problems(self) -> list[str]:
        return [
            f"thread {r.thread.tid} ({r.thread.comm}): {p}" for r in self.rows for p in r.problems
        ] + list(self.problems)


# --- roles ---------------------------------------------------------------------------------


def runner_of(pod: Pod) -> int | None:
    """QEMU's parent; without QEMU, the first instance-runner that is not this command."""
    by_pid = _by_pid(pod)
    qemu = by_pid.get(pod.qemu_pid) if pod.qemu_pid is not None else None
    if qemu is not None:
        return qemu.ppid if qemu.ppid in by_pid else None
    return next(
        (p for p in sorted(by_pid) if by_pid[p].comm == RUNNER_COMM and p != pod.self_pid), None
    )


def anchor_of(pod: Pod, runner: int | None) -> int | None:
    """The runner's `sleep infinity` child (the lowest PID if there were several)."""
    for p in sorted(pod.processes, key=lambda p: p.pid):
        if p.cmdline == ANCHOR_ARGV and (runner is None or p.ppid == runner):
            return p.pid
    return None


def vcpu_index(pod: Pod, thread: ThreadView) -> int | None:
    if thread.tid in pod.vcpu_tids:
        return pod.vcpu_tids[thread.tid]
    m = _VCPU_NAME.match(thread.comm)
    return int(m.group(1)) if m else None


def role_of(
    pod: Pod, proc: Process, thread: ThreadView, runner: int | None, anchor: int | None
) -> tuple[Role, int | None]:
    if proc.pid == pod.qemu_pid:
        if thread.tid == proc.pid:
            return "qemu-main", None
        n = vcpu_index(pod, thread)
        if n is not None:
            return "vcpu", n
        return ("io-thread" if thread.comm.startswith("IO ") else "helper"), None
    if proc.pid == pod.self_pid:
        return "inspect", None
    if proc.pid == anchor:
        return "anchor", None
    if proc.pid == runner:
        return "runner", None
    if proc.comm in HELPERS:
        return "helper", None
    return "other", None


def container_of(pod: Pod, anchor: int | None) -> str | None:
    """The container cgroup: the anchor's, or else the first cgroup of the pod's processes
    (outside float and the instance cgroup) that names a Kubernetes container."""
    by_pid = _by_pid(pod)
    if anchor is not None and by_pid[anchor].threads:
        return by_pid[anchor].threads[0].cgroup
    for p in sorted(pod.processes, key=lambda p: p.pid):
        for t in p.threads:
            if t.cgroup in (pod.float_cgroup, pod.instance_cgroup):
                continue
            try:
                return kube.parse_pod_cgroup(t.cgroup).path
            except kube.KubeError:
                continue
    return None


# --- the invariants ------------------------------------------------------------------------


def inspect(pod: Pod) -> Report:
    runner = runner_of(pod)
    anchor = anchor_of(pod, runner)
    container = container_of(pod, anchor)
    rows: list[Row] = []
    for proc in sorted(pod.processes, key=lambda p: p.pid):
        for t in sorted(proc.threads, key=lambda t: t.tid):
            role, n = role_of(pod, proc, t, runner, anchor)
            problems = _thread_problems(pod, container, t, role, n)
            rows.append(Row(t, proc.comm, role, n, pod.nodes.get(t.last_cpu), problems))
    rows = _shared_cpus(rows, pod)
    return Report(pod, container, runner, anchor, tuple(rows), _pod_problems(pod, rows))


def _thread_problems(
    pod: Pod, container: str | None, t: ThreadView, role: Role, n: int | None
) -> tuple[str, ...]:
    out: list[str] = []
    if role == "vcpu":
        if t.cgroup != pod.instance_cgroup:
            out.append(f"vCPU {n} is in {t.cgroup}, not in the instance cgroup")
        want = pod.vcpu_cpus.get(n) if n is not None else None
        if want is not None and t.allowed != {want}:
            out.append(f"vCPU {n} is allowed on CPUs {_fmt(t.allowed)}, not on CPU {want} alone")
        elif want is None and (len(t.allowed) != 1 or not t.allowed <= pod.dedicated):
            out.append(
                f"vCPU {n} is allowed on CPUs {_fmt(t.allowed)}, not on one dedicated CPU alone"
            )
        return tuple(out)
    if t.cgroup == pod.instance_cgroup:
        out.append("in the instance cgroup, which is for vCPUs only")
    # The anchor sleeps in the container cgroup, whose CPUs are the dedicated ones; the
    # inspecting process lands there too when it is exec'd into the pod.
    if role not in ("anchor", "inspect") and t.allowed & pod.dedicated:
        out.append(f"allowed on dedicated CPUs {_fmt(t.allowed & pod.dedicated)}")
    if role not in ("anchor", "inspect") and container is not None and t.cgroup == container:
        out.append("in the container cgroup, where only the anchor belongs")
    return tuple(out)


def _shared_cpus(rows: list[Row], pod: Pod) -> list[Row]:
    """Two vCPUs on one CPU: each gets half of what was paid for. Only checked where the
    ready file does not say which CPU is whose (then the per-vCPU check catches it)."""

    def alone(r: Row) -> bool:
        return r.role == "vcpu" and len(r.thread.allowed) == 1 and r.vcpu not in pod.vcpu_cpus

    count = Counter(c for r in rows if alone(r) for c in r.thread.allowed)
    out = []
    for r in rows:
        if alone(r):
            (cpu,) = r.thread.allowed
            if count[cpu] > 1:
                r = attrs.evolve(r, problems=(*r.problems, f"shares CPU {cpu} with another vCPU"))
        out.append(r)
    return out


def _pod_problems(pod: Pod, rows: list[Row]) -> tuple[str, ...]:
    out: list[str] = []
    found = {r.vcpu for r in rows if r.role == "vcpu"}
    for n in sorted(set(pod.vcpu_cpus) | set(pod.vcpu_tids.values())):
        if n not in found:
            out.append(f"vCPU {n} has no thread")
    tids = {r.thread.tid for r in rows}
    for tid in sorted((pod.instance_tids or frozenset()) - tids):
        # 0: a thread this PID namespace cannot see, so not the pod's either.
        out.append(
            f"thread {tid} in the instance cgroup is none of the pod's"
            if tid > 0
            else "a thread from outside the pod's PID namespace is in the instance cgroup"
        )
    if pod.foreign_in_container:
        out.append(
            f"{pod.foreign_in_container} process(es) from outside the pod's PID namespace "
            "in the container cgroup"
        )
    return tuple(out)


# --- showing it ----------------------------------------------------------------------------

ROLE_LABELS: Mapping[Role, str] = {
    "vcpu": "vCPU",
    "qemu-main": "QEMU main",
    "io-thread": "IO thread",
    "helper": "helper",
    "runner": "runner",
    "anchor": "anchor",
    "inspect": "inspect",
    "other": "other",
}
HEADERS = ("", "PID", "TID", "NAME", "ROLE", "CGROUP", "CPUS", "LAST", "NODE", "RUN DELAY")
RIGHT = {1, 2, 7, 8, 9}  # numbers align right


def role_label(row: Row) -> str:
    return f"vCPU {row.vcpu}" if row.role == "vcpu" else ROLE_LABELS[row.role]


def short_cgroup(report: Report, path: str) -> str:
    """The three cgroups that matter by name (their paths are in the heading)."""
    names = {
        report.pod.instance_cgroup: "instance",
        report.pod.float_cgroup: "float",
        report.container_cgroup: "container",
    }
    return names.get(path) or path or "-"


def delay(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def table(report: Report) -> str:
    pod = report.pod
    vcpus = sum(1 for r in report.rows if r.role == "vcpu")
    processes = len({r.thread.pid for r in report.rows})
    lines = [
        f"pod {pod.uid or '?'} (seen from the {pod.seen_from})",
        f"  instance   {pod.instance_cgroup}  CPUs {_fmt(pod.dedicated) or '-'}",
        f"  float      {pod.float_cgroup or '?'}  CPUs "
        + (_fmt(pod.float_cpus) if pod.float_cpus is not None else "?"),
        f"  container  {report.container_cgroup or '?'}",
        "",
    ]
    cells = [HEADERS] + [
        (
            "!" if r.problems else "",
            str(r.thread.pid),
            str(r.thread.tid),
            r.thread.comm,
            role_label(r),
            short_cgroup(report, r.thread.cgroup),
            _fmt(r.thread.allowed),
            str(r.thread.last_cpu),
            "-" if r.node is None else str(r.node),
            delay(r.thread.delay_ns),
        )
        for r in report.rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    for row in cells:
        parts = [
            c.rjust(w) if i in RIGHT else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(("  " + "  ".join(parts)).rstrip())
    lines.append("")
    lines += [f"  ! {p}" for p in report.all_problems()]
    lines += [f"  note: {n}" for n in pod.notes]
    verdict = "ok" if report.ok else f"{len(report.all_problems())} problem(s)"
    lines.append(
        f"  {vcpus} vCPUs on CPUs {_fmt(pod.dedicated) or '-'}, {len(report.rows)} threads "
        f"in {processes} processes: {verdict}"
    )
    return "\n".join(lines)


def tables(reports: Iterable[Report]) -> str:
    # A thread names itself with any bytes: shown, never a reason for the terminal to fail.
    return printable("\n\n".join(table(r) for r in reports))


def document(reports: Iterable[Report]) -> dict[str, Any]:
    instances = [_instance_doc(r) for r in reports]
    return {"ok": all(i["ok"] for i in instances), "instances": instances}


def _instance_doc(report: Report) -> dict[str, Any]:
    pod = report.pod
    return {
        "pod_uid": pod.uid,
        "seen_from": pod.seen_from,
        "ok": report.ok,
        "instance_cgroup": pod.instance_cgroup,
        "float_cgroup": pod.float_cgroup,
        "container_cgroup": report.container_cgroup,
        "dedicated_cpus": _fmt(pod.dedicated),
        "float_cpus": _fmt(pod.float_cpus) if pod.float_cpus is not None else None,
        "qemu_pid": pod.qemu_pid,
        "runner_pid": report.runner_pid,
        "anchor_pid": report.anchor_pid,
        "problems": report.all_problems(),
        "notes": list(pod.notes),
        "threads": [
            {
                "pid": r.thread.pid,
                "tid": r.thread.tid,
                "name": r.thread.comm,
                "process": r.process,
                "role": r.role,
                "vcpu": r.vcpu,
                "cgroup": r.thread.cgroup,
                "allowed_cpus": _fmt(r.thread.allowed),
                "last_cpu": r.thread.last_cpu,
                "numa_node": r.node,
                "run_delay_ns": r.thread.delay_ns,
                "run_ns": r.thread.run_ns,
                "policy": r.thread.policy,
                "problems": list(r.problems),
            }
            for r in report.rows
        ],
    }


def _by_pid(pod: Pod) -> dict[int, Process]:
    return {p.pid: p for p in pod.processes}


def _fmt(cpu_set: CpuSet) -> str:
    return cpus.format(cpu_set)
