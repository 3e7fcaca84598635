"""inspect's judgement of a pod: roles, the pinning invariants, the table and the JSON, on
pods made up here (the VM test runs it on real ones)."""

from __future__ import annotations

import json
import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import podview
from runner.node.procfs import ThreadView
from runner.podview import Pod, Process

UID = "0a1b2c3d-1111-2222-3333-444455556666"
INSTANCE = f"/instances/instance-{UID}"
FLOAT = "/instances/float"
CONTAINER = (
    f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{'a' * 64}.scope"
)
DEDICATED = frozenset({1, 2})
SHARED = frozenset({0, 3})


def thread(
    pid: int, tid: int, comm: str, cgroup: str = FLOAT, allowed: frozenset[int] = SHARED
) -> ThreadView:
    return ThreadView(
        pid=pid,
        tid=tid,
        comm=comm,
        cgroup=cgroup,
        allowed=allowed,
        last_cpu=min(allowed),
        policy="other",
        rt_priority=0,
        run_ns=1_000_000,
        delay_ns=2_500_000,
        involuntary=0,
    )


def proc(
    pid: int, ppid: int, comm: str, *threads: ThreadView, argv: tuple[str, ...] = ()
) -> Process:
    return Process(pid, ppid, comm, argv or (comm,), threads or (thread(pid, pid, comm),))


def healthy(**changes: object) -> Pod:
    """A pinned 2-vCPU pod as the runner leaves it, seen from inside (PID 1 is the runner)."""
    pod = Pod(
        uid=UID,
        seen_from="pod",
        instance_cgroup=INSTANCE,
        float_cgroup=FLOAT,
        float_cpus=SHARED,
        dedicated=DEDICATED,
        qemu_pid=10,
        self_pid=None,
        processes=(
            proc(1, 0, "instance-runner", thread(1, 1, "instance-runner"), thread(1, 7, "trio")),
            proc(
                5,
                1,
                "sleep",
                thread(5, 5, "sleep", CONTAINER, DEDICATED),
                argv=("sleep", "infinity"),
            ),
            proc(
                10,
                1,
                "qemu-system-x86",
                thread(10, 10, "qemu-system-x86"),
                thread(10, 11, "call_rcu"),
                thread(10, 12, "IO mon_iothread"),
                thread(10, 13, "CPU 0/TCG", INSTANCE, frozenset({1})),
                thread(10, 14, "CPU 1/TCG", INSTANCE, frozenset({2})),
                thread(10, 15, "worker"),
            ),
            proc(20, 1, "dnsmasq"),
        ),
        instance_tids=frozenset({13, 14}),
        vcpu_tids={13: 0, 14: 1},
        vcpu_cpus={0: 1, 1: 2},
        nodes={0: 0, 1: 0, 2: 1, 3: 1},
    )
    return attrs.evolve(pod, **changes)


def with_process(pod: Pod, p: Process) -> Pod:
    return attrs.evolve(pod, processes=(*pod.processes, p))


def rows_by_tid(report: podview.Report) -> dict[int, podview.Row]:
    return {r.thread.tid: r for r in report.rows}


# --- roles ---------------------------------------------------------------------------------


def test_a_pinned_pod_holds_every_invariant() -> None:
    report = podview.inspect(healthy())
    assert report.ok and report.all_problems() == []
    roles = {tid: (r.role, r.vcpu) for tid, r in rows_by_tid(report).items()}
    assert roles == {
        1: ("runner", None),
        7: ("runner", None),
        5: ("anchor", None),
        10: ("qemu-main", None),
        11: ("helper", None),
        12: ("io-thread", None),
        13: ("vcpu", 0),
        14: ("vcpu", 1),
        15: ("helper", None),
        20: ("helper", None),
    }
    assert (report.runner_pid, report.anchor_pid) == (1, 5)
    assert report.container_cgroup == CONTAINER
    assert rows_by_tid(report)[14].node == 1  # CPU 2's node


def test_vcpus_are_found_by_name_without_a_ready_file() -> None:
    report = podview.inspect(healthy(vcpu_tids={}, vcpu_cpus={}, seen_from="node"))
    assert report.ok
    assert [(r.thread.tid, r.vcpu) for r in report.rows if r.role == "vcpu"] == [(13, 0), (14, 1)]


def test_the_container_cgroup_without_an_anchor_is_the_pods_kubernetes_cgroup() -> None:
    pod = healthy()
    pod = attrs.evolve(pod, processes=tuple(p for p in pod.processes if p.pid != 5))
    pod = with_process(pod, proc(30, 0, "sh", thread(30, 30, "sh", CONTAINER, DEDICATED)))
    report = podview.inspect(pod)
    assert report.anchor_pid is None and report.container_cgroup == CONTAINER
    assert rows_by_tid(report)[30].role == "other"
    assert not report.ok


# --- the invariants ------------------------------------------------------------------------


def test_a_busy_process_in_the_container_cgroup_is_marked() -> None:
    pod = with_process(healthy(), proc(30, 0, "sh", thread(30, 30, "sh", CONTAINER, DEDICATED)))
    report = podview.inspect(pod)
    assert not report.ok
    assert rows_by_tid(report)[30].problems == (
        "allowed on dedicated CPUs 1-2",
        "in the container cgroup, where only the anchor belongs",
    )
    assert [r.thread.tid for r in report.rows if r.problems] == [30]


def test_the_inspecting_process_may_sit_in_the_container_cgroup() -> None:
    me = proc(40, 0, "instance-runner", thread(40, 40, "instance-runner", CONTAINER, DEDICATED))
    report = podview.inspect(attrs.evolve(with_process(healthy(), me), self_pid=40))
    assert report.ok and rows_by_tid(report)[40].role == "inspect"


@pytest.mark.parametrize(
    ("cgroup", "allowed", "problem"),
    [
        (FLOAT, frozenset({1}), "vCPU 1 is in /instances/float, not in the instance cgroup"),
        (INSTANCE, frozenset({1, 2}), "vCPU 1 is allowed on CPUs 1-2, not on CPU 2 alone"),
        (INSTANCE, frozenset({1}), "vCPU 1 is allowed on CPUs 1, not on CPU 2 alone"),
    ],
)
def test_a_vcpu_off_its_cpu_or_cgroup(cgroup: str, allowed: frozenset[int], problem: str) -> None:
    pod = healthy()
    qemu = pod.processes[2]
    moved = tuple(
        thread(10, 14, "CPU 1/TCG", cgroup, allowed) if t.tid == 14 else t for t in qemu.threads
    )
    pod = attrs.evolve(pod, processes=(*pod.processes[:2], attrs.evolve(qemu, threads=moved)))
    report = podview.inspect(pod)
    assert problem in rows_by_tid(report)[14].problems
    assert report.all_problems()[0].startswith("thread 14 (CPU 1/TCG): vCPU 1")


def test_without_a_ready_file_vcpus_must_each_hold_one_dedicated_cpu() -> None:
    pod = healthy(vcpu_tids={}, vcpu_cpus={})
    qemu = pod.processes[2]
    moved = tuple(
        thread(10, 14, "CPU 1/TCG", INSTANCE, frozenset({1})) if t.tid == 14 else t
        for t in qemu.threads
    )
    pod = attrs.evolve(pod, processes=(*pod.processes[:2], attrs.evolve(qemu, threads=moved)))
    report = podview.inspect(pod)
    assert rows_by_tid(report)[13].problems == ("shares CPU 1 with another vCPU",)
    assert rows_by_tid(report)[14].problems == ("shares CPU 1 with another vCPU",)
    off = attrs.evolve(
        qemu,
        threads=tuple(
            thread(10, 14, "CPU 1/TCG", INSTANCE, frozenset({3})) if t.tid == 14 else t
            for t in qemu.threads
        ),
    )
    report = podview.inspect(attrs.evolve(pod, processes=(*pod.processes[:2], off)))
    assert rows_by_tid(report)[14].problems == (
        "vCPU 1 is allowed on CPUs 3, not on one dedicated CPU alone",
    )


def test_only_vcpus_in_the_instance_cgroup() -> None:
    pod = with_process(healthy(), proc(30, 1, "virtiofsd", thread(30, 30, "virtiofsd", INSTANCE)))
    report = podview.inspect(pod)
    assert rows_by_tid(report)[30].problems == ("in the instance cgroup, which is for vCPUs only",)


def test_helpers_on_dedicated_cpus() -> None:
    pod = with_process(
        healthy(), proc(30, 1, "dnsmasq", thread(30, 30, "dnsmasq", FLOAT, frozenset({0, 1})))
    )
    report = podview.inspect(pod)
    assert rows_by_tid(report)[30].problems == ("allowed on dedicated CPUs 1",)


def test_a_thread_this_namespace_cannot_see_in_the_instance_cgroup() -> None:
    report = podview.inspect(healthy(instance_tids=frozenset({0, 13, 14})))
    assert report.problems == (
        "a thread from outside the pod's PID namespace is in the instance cgroup",
    )


def test_the_pods_own_problems() -> None:
    pod = healthy(
        vcpu_cpus={0: 1, 1: 2, 2: 3},
        instance_tids=frozenset({13, 14, 99}),
        foreign_in_container=2,
    )
    report = podview.inspect(pod)
    assert report.problems == (
        "vCPU 2 has no thread",
        "thread 99 in the instance cgroup is none of the pod's",
        "2 process(es) from outside the pod's PID namespace in the container cgroup",
    )
    assert not report.ok


# --- showing it ----------------------------------------------------------------------------


def test_the_table() -> None:
    pod = with_process(healthy(), proc(30, 0, "sh", thread(30, 30, "sh", CONTAINER, DEDICATED)))
    text = podview.table(podview.inspect(pod))
    lines = text.splitlines()
    assert lines[0] == f"pod {UID} (seen from the pod)"
    assert f"instance   {INSTANCE}  CPUs 1-2" in text
    assert f"container  {CONTAINER}" in text
    header = next(i for i, line in enumerate(lines) if "PID" in line and "RUN DELAY" in line)
    body = lines[header + 1 : header + 12]
    # Aligned: words start where their heading does, numbers end where theirs does.
    for name in ("NAME", "CGROUP", "CPUS"):
        col = lines[header].index(name)
        assert all(line[col - 1] == " " and line[col] != " " for line in body), name
    for name in ("TID", "LAST"):
        end = lines[header].index(name) + len(name)
        assert all(line[end - 1] != " " and line[end] == " " for line in body), name
    vcpu = next(line for line in body if "CPU 1/TCG" in line)
    assert re.search(r"vCPU 1 +instance +2 +2 +1 +2\.5 ms$", vcpu)
    busy = next(line for line in body if " sh " in line)
    assert busy.startswith("  !") and "container" in busy
    assert not any(line.startswith("  !") for line in body if " sh " not in line)
    assert "  ! thread 30 (sh): in the container cgroup, where only the anchor belongs" in lines
    assert lines[-1] == "  2 vCPUs on CPUs 1-2, 11 threads in 5 processes: 2 problem(s)"
    assert podview.table(podview.inspect(healthy())).endswith("in 4 processes: ok")


def test_the_json_document() -> None:
    pod = with_process(healthy(), proc(30, 0, "sh", thread(30, 30, "sh", CONTAINER, DEDICATED)))
    doc = json.loads(
        json.dumps(podview.document([podview.inspect(healthy()), podview.inspect(pod)]))
    )
    assert doc["ok"] is False
    good, bad = doc["instances"]
    assert good["ok"] and good["problems"] == []
    assert good["dedicated_cpus"] == "1-2" and good["float_cpus"] == "0,3"
    assert (good["qemu_pid"], good["runner_pid"], good["anchor_pid"]) == (10, 1, 5)
    vcpu = next(t for t in good["threads"] if t["tid"] == 13)
    assert vcpu == {
        "pid": 10,
        "tid": 13,
        "name": "CPU 0/TCG",
        "process": "qemu-system-x86",
        "role": "vcpu",
        "vcpu": 0,
        "cgroup": INSTANCE,
        "allowed_cpus": "1",
        "last_cpu": 1,
        "numa_node": 0,
        "run_delay_ns": 2_500_000,
        "run_ns": 1_000_000,
        "policy": "other",
        "problems": [],
    }
    assert not bad["ok"] and len(bad["problems"]) == 2
    assert next(t for t in bad["threads"] if t["tid"] == 30)["problems"]


def test_unknown_numa_nodes_are_blank() -> None:
    report = podview.inspect(healthy(nodes={}, notes=("NUMA nodes unknown: no sysfs",)))
    assert report.ok and all(r.node is None for r in report.rows)
    assert "  note: NUMA nodes unknown: no sysfs" in podview.table(report)


# --- properties ----------------------------------------------------------------------------


@st.composite
def pinned_pods(draw: st.DrawFn) -> Pod:
    """A pod as the runner leaves it: n vCPUs on n of 16 CPUs, everything else in float."""
    online = frozenset(range(16))
    dedicated = frozenset(draw(st.sets(st.integers(0, 15), min_size=1, max_size=8)))
    shared = online - dedicated
    placed = sorted(dedicated)
    vcpus = tuple(
        thread(10, 100 + i, f"CPU {i}/KVM", INSTANCE, frozenset({c})) for i, c in enumerate(placed)
    )
    others = tuple(
        thread(
            10,
            200 + i,
            draw(st.sampled_from(["worker", "IO iothread0", "call_rcu"])),
            FLOAT,
            shared,
        )
        for i in range(draw(st.integers(0, 4)))
    )
    helpers = tuple(
        proc(300 + i, 1, name, thread(300 + i, 300 + i, name, FLOAT, shared))
        for i, name in enumerate(draw(st.lists(st.sampled_from(podview.HELPERS), max_size=3)))
    )
    return Pod(
        uid=UID,
        seen_from=draw(st.sampled_from(["pod", "node"])),
        instance_cgroup=INSTANCE,
        float_cgroup=FLOAT,
        float_cpus=shared,
        dedicated=dedicated,
        qemu_pid=10,
        self_pid=None,
        processes=(
            proc(1, 0, "instance-runner", thread(1, 1, "instance-runner", FLOAT, shared)),
            proc(
                5, 1, "sleep", thread(5, 5, "sleep", CONTAINER, dedicated), argv=podview.ANCHOR_ARGV
            ),
            Process(
                10,
                1,
                "qemu-system-x86",
                ("qemu-system-x86_64",),
                (thread(10, 10, "qemu-system-x86", FLOAT, shared), *vcpus, *others),
            ),
            *helpers,
        ),
        instance_tids=frozenset(t.tid for t in vcpus),
        vcpu_cpus=draw(st.sampled_from([{i: c for i, c in enumerate(placed)}, {}])),
    )


@given(pinned_pods())
def test_a_pinned_pod_is_ok_and_shows_every_thread(pod: Pod) -> None:
    report = podview.inspect(pod)
    assert report.ok, report.all_problems()
    assert len(report.rows) == sum(len(p.threads) for p in pod.processes)
    assert sorted(r.vcpu for r in report.rows if r.role == "vcpu") == list(
        range(len(pod.dedicated))
    )
    assert podview.document([report])["ok"] is True
    assert podview.table(report).endswith(": ok")


@given(pinned_pods(), st.data())
def test_any_other_thread_let_onto_a_dedicated_cpu_is_marked_alone(
    pod: Pod, data: st.DataObject
) -> None:
    candidates = [
        (p, t)
        for p in pod.processes
        for t in p.threads
        if p.pid != 5 and not t.comm.startswith("CPU ")
    ]
    p, t = data.draw(st.sampled_from(candidates))
    cpu = data.draw(st.sampled_from(sorted(pod.dedicated)))
    spilled = attrs.evolve(t, allowed=t.allowed | {cpu})
    changed = attrs.evolve(p, threads=tuple(spilled if x.tid == t.tid else x for x in p.threads))
    pod = attrs.evolve(
        pod, processes=tuple(changed if x.pid == p.pid else x for x in pod.processes)
    )
    report = podview.inspect(pod)
    assert not report.ok
    assert [r.thread.tid for r in report.rows if r.problems] == [t.tid]
    assert report.all_problems() == [f"thread {t.tid} ({t.comm}): allowed on dedicated CPUs {cpu}"]
    assert podview.document([report])["ok"] is False
