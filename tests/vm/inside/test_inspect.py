"""`instance-runner inspect` on a real pod: one runner pod (2 vCPUs on CPUs 1-2 of 4, nothing
swept while the tests run) read from the node and from inside the pod, then with busy
processes written into its container cgroup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import CG, Node, kube_cgroups, uid_forms, wait_for
from .pods import (
    RUNNER,
    RunnerPod,
    assert_nothing_left,
    comm,
    container_of,
    float_of,
    host_vcpus,
    pod_processes,
    start_runner,
    task_cgroup,
    tasks,
)

RUN_DIR_BASE = Path("/run/instance-runner")


class Pinned:
    def __init__(self, rp: RunnerPod, ready: dict) -> None:
        self.rp, self.ready = rp, ready
        self.uid = rp.pod.uid
        self.runner = rp.runner_pid()
        self.ns = os.readlink(f"/proc/{self.runner}/ns/pid")
        self.container = container_of(self.uid)
        self.vcpus = host_vcpus(rp, ready)

    def threads(self) -> set[tuple[int, int]]:
        found = set()
        for p in pod_processes(self.ns):
            try:
                found |= {(p, t) for t in tasks(p)}
            except OSError:
                continue  # gone
        return found


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pinned]:
    """The runner picks its run dir (/run/instance-runner/<uid>), as in a real pod, so that
    inspect finds it from inside with no option."""
    tmp = tmp_path_factory.mktemp("inspect")
    node = Node(tmp)
    uid = str(uuid.uuid4())
    rp = start_runner(
        node,
        tmp,
        "1-2",
        "--verify-interval",
        "0",
        uid=uid,
        default_run_dir=True,
        run_dir=RUN_DIR_BASE / uid,
    )
    try:
        yield Pinned(rp, rp.wait_ready())
    finally:
        if rp.pod.proc.poll() is None:
            rp.pod.proc.send_signal(signal.SIGTERM)
        code, err = rp.finish()
        assert code == 0, err
        assert_nothing_left(uid)
        assert not [c for c in kube_cgroups() if any(f in c for f in uid_forms(uid))]


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    """On the node."""
    return subprocess.run([RUNNER, "inspect", *args], capture_output=True, text=True, timeout=300)


def inspect_inside(p: Pinned, *args: str) -> subprocess.CompletedProcess[str]:
    """As `kubectl exec` runs it: in the pod's PID and mount namespaces (its own /proc) and
    root (the test VM's init chroots), in the container cgroup, with no option telling it
    which pod it is in."""
    join = 'echo $$ > "$0" && exec "$@"'
    return subprocess.run(
        [
            *enter(p, "-m", "-r"),
            "sh",
            "-c",
            join,
            str(p.container / "cgroup.procs"),
            RUNNER,
            "inspect",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def enter(p: Pinned, *namespaces: str) -> list[str]:
    """Into the pod's PID namespace (and more): nsenter forks the command there."""
    return ["nsenter", "-t", str(p.runner), "-p", *namespaces, "--"]


def only(doc: dict) -> dict:
    (instance,) = doc["instances"]
    return instance


def test_from_the_node_every_thread_of_the_pod(pod: Pinned) -> None:
    before = pod.threads()
    r = inspect("--json", "--pod", pod.uid)
    after = pod.threads()
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    got = only(doc)
    assert got["problems"] == [] and got["ok"] is True
    assert got["pod_uid"] == pod.uid and got["seen_from"] == "node"
    assert got["instance_cgroup"] == f"/instances/instance-{pod.uid}"
    assert got["float_cgroup"] == float_of(pod.uid)
    assert got["container_cgroup"] == f"/{pod.container.relative_to(CG)}"
    assert (got["dedicated_cpus"], got["float_cpus"]) == ("1-2", "0,3")

    # Every thread of every process in the pod's PID namespace, and nothing else (QEMU's
    # worker threads come and go: those seen both before and after must be there).
    seen = {(t["pid"], t["tid"]) for t in got["threads"]}
    assert before & after <= seen <= before | after
    assert {p for p, _t in seen} == {p for p, _t in before & after}
    for t in got["threads"]:
        if (t["pid"], t["tid"]) in before & after:
            assert t["cgroup"] == task_cgroup(t["pid"], t["tid"])
            assert t["name"] == Path(f"/proc/{t['pid']}/task/{t['tid']}/comm").read_text().strip()
        assert t["numa_node"] == 0 and t["run_delay_ns"] >= 0 and t["problems"] == []

    vcpus = [t for t in got["threads"] if t["role"] == "vcpu"]
    assert [(t["vcpu"], t["tid"], t["allowed_cpus"]) for t in vcpus] == [
        (v["vcpu"], v["tid"], str(v["cpu"])) for v in sorted(pod.vcpus, key=lambda v: v["vcpu"])
    ]
    assert {t["last_cpu"] for t in vcpus} <= {1, 2}
    qemu = got["qemu_pid"]
    assert comm(qemu).startswith("qemu-system")
    roles = {(t["pid"], t["tid"]): t["role"] for t in got["threads"]}
    assert roles[(qemu, qemu)] == "qemu-main"
    assert got["runner_pid"] == pod.runner and roles[(pod.runner, pod.runner)] == "runner"
    (anchor,) = (int(p) for p in (pod.container / "cgroup.procs").read_text().split())
    assert got["anchor_pid"] == anchor and roles[(anchor, anchor)] == "anchor"
    assert {t["role"] for t in got["threads"] if t["pid"] == qemu} >= {
        "qemu-main",
        "vcpu",
        "helper",
    }


def test_from_inside_the_pod_the_same_instance(pod: Pinned) -> None:
    r = inspect_inside(pod, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    got = only(json.loads(r.stdout))
    assert got["ok"] and got["pod_uid"] == pod.uid and got["seen_from"] == "pod"
    assert got["instance_cgroup"] == f"/instances/instance-{pod.uid}"
    assert got["container_cgroup"] == f"/{pod.container.relative_to(CG)}"
    # PIDs as the pod numbers them: the runner is PID 1, the vCPUs are the ready file's.
    assert got["runner_pid"] == 1
    vcpus = [
        (t["vcpu"], t["tid"], t["allowed_cpus"]) for t in got["threads"] if t["role"] == "vcpu"
    ]
    assert vcpus == [(v["vcpu"], v["tid"], str(v["cpu"])) for v in pod.ready["vcpus"]]
    # It sat in the container cgroup, on the dedicated CPUs, as an exec'd process does.
    mine = [t for t in got["threads"] if t["role"] == "inspect"]
    assert mine and all(t["cgroup"] == got["container_cgroup"] for t in mine)
    assert all(t["allowed_cpus"] == "1-2" for t in mine)
    processes = sorted({(t["pid"], t["process"]) for t in got["threads"] if t["role"] != "inspect"})
    node_view = {comm(p) for p in pod_processes(pod.ns)}
    assert {name for _pid, name in processes} == node_view


def test_the_table(pod: Pinned) -> None:
    r = inspect()  # on the node, no option: every instance
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)  # shown with -s: the table people read
    lines = r.stdout.splitlines()
    assert f"pod {pod.uid} (seen from the node)" in lines
    header = next(line for line in lines if line.split()[:3] == ["PID", "TID", "NAME"])
    assert header.split()[-2:] == ["RUN", "DELAY"]
    for v in pod.vcpus:
        row = next(line for line in lines if line.split()[1:2] == [str(v["tid"])])
        assert f"vCPU {v['vcpu']}" in row and " instance " in row
    assert not any(line.startswith("  !") for line in lines)
    assert lines[-1].startswith("  2 vCPUs on CPUs 1-2, ") and lines[-1].endswith(": ok")


def test_a_busy_process_in_the_container_cgroup_is_marked(pod: Pinned) -> None:
    """One exec'd into the pod (its PID namespace), one from the node written in; both land
    on the dedicated CPUs. Nothing sweeps them (--verify-interval 0)."""
    procs = str(pod.container / "cgroup.procs")
    busy = 'echo $$ > "$0"; while :; do :; done'
    inside = subprocess.Popen(
        [*enter(pod), "sh", "-c", busy, procs],
        start_new_session=True,
    )
    outside = subprocess.Popen(["sh", "-c", busy, procs], start_new_session=True)
    try:
        listed = wait_for(
            lambda: (
                (p := (pod.container / "cgroup.procs").read_text().split()) and len(p) == 3 and p
            ),
            what="both busy processes in the container cgroup",
        )
        busy_pids = {int(p) for p in listed} - {only_anchor(pod)}
        assert outside.pid in busy_pids

        r = inspect("--json", "--pod", pod.uid)
        assert r.returncode == 1, r.stdout + r.stderr
        got = only(json.loads(r.stdout))
        assert got["ok"] is False
        marked = {t["pid"] for t in got["threads"] if t["problems"]}
        assert marked == busy_pids
        for t in got["threads"]:
            if t["pid"] in busy_pids:
                assert t["role"] == "other" and t["cgroup"] == got["container_cgroup"]
                assert "in the container cgroup, where only the anchor belongs" in t["problems"]
                assert "allowed on dedicated CPUs 1-2" in t["problems"]
        assert len(got["problems"]) == 4

        r = inspect_inside(pod, "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        got = only(json.loads(r.stdout))
        marked_inside = [t for t in got["threads"] if t["problems"]]
        assert [t["name"] for t in marked_inside] == ["sh"]  # the one in its namespace
        assert marked_inside[0]["role"] == "other"
        assert (
            "1 process(es) from outside the pod's PID namespace in the container cgroup"
            in got["problems"]
        )
    finally:
        for p in (inside, outside):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    wait_for(
        lambda: len((pod.container / "cgroup.procs").read_text().split()) == 1,
        what="the busy processes gone",
    )


def only_anchor(pod: Pinned) -> int:
    return next(
        int(p)
        for p in (pod.container / "cgroup.procs").read_text().split()
        if Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\0infinity\0"
    )


def test_an_unknown_pod_is_one_line(pod: Pinned) -> None:
    other = str(uuid.uuid4())
    r = inspect("--pod", other)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"instance-runner: no instance cgroup for pod {other} "
        f"(no /sys/fs/cgroup/instances/instance-{other})\n"
    )
