"""podsim inside the test VM: kubelet's paths and files, signals, allocation, refusals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .conftest import CG, POD_SCRIPT, PODSIM, Node, Pod, kube_cgroups, ns_init_pid, wait_for

CID = "ab" * 32


def expected_path(uid: str, qos: str, driver: str, runtime: str) -> str:
    """NOTES §3, spelled out case by case rather than computed like podsim does."""
    u = uid.replace("-", "_")
    table = {
        ("systemd", "guaranteed"): f"/kubepods.slice/kubepods-pod{u}.slice",
        (
            "systemd",
            "burstable",
        ): f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice",
        (
            "systemd",
            "besteffort",
        ): f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice",
        ("cgroupfs", "guaranteed"): f"/kubepods/pod{uid}",
        ("cgroupfs", "burstable"): f"/kubepods/burstable/pod{uid}",
        ("cgroupfs", "besteffort"): f"/kubepods/besteffort/pod{uid}",
    }
    leaf = {
        ("systemd", "containerd"): f"cri-containerd-{CID}.scope",
        ("cgroupfs", "containerd"): CID,
        ("systemd", "crio"): f"crio-{CID}.scope",
        ("cgroupfs", "crio"): f"crio-{CID}",
    }
    return f"{table[driver, qos]}/{leaf[driver, runtime]}"


CASES = [
    (d, q, "containerd")
    for d in ("systemd", "cgroupfs")
    for q in ("guaranteed", "burstable", "besteffort")
]
CASES += [("systemd", "guaranteed", "crio"), ("cgroupfs", "besteffort", "crio")]


@pytest.mark.parametrize(("driver", "qos", "runtime"), CASES)
def test_pod_paths_files_and_clean_exit(node: Node, driver: str, qos: str, runtime: str) -> None:
    static_uid = qos == "besteffort"  # static pods have 32-hex UIDs without dashes
    uid = uuid.uuid4().hex if static_uid else str(uuid.uuid4())
    cpus = ["--cpus", "1-2"] if qos == "guaranteed" else []
    pod = node.start(
        *cpus,
        "--qos",
        qos,
        "--driver",
        driver,
        "--runtime",
        runtime,
        "--container-id",
        CID,
        uid=uid,
    ).wait_ready()
    path = expected_path(uid, qos, driver, runtime)
    container = CG / path.lstrip("/")

    assert pod.read("cpuset") == path  # PID 1 sees the full host path: no cgroup namespace
    assert pod.read("nspid") == "1"
    init = ns_init_pid(container)
    assert Path(f"/proc/{init}/cgroup").read_text() == f"0::{path}\n"
    for level in container.parents:
        if level == CG.parent:
            break
        assert "cpuset" in (level / "cgroup.subtree_control").read_text().split()
    state = node.state()
    if qos == "guaranteed":
        assert (container / "cpuset.cpus").read_text() == "1-2\n"
        assert state["defaultCpuSet"] == "0,3"
        assert state["entries"] == {uid: {"compute": "1-2"}}
    else:
        assert (container / "cpuset.cpus").read_text() == "0-3\n"
        assert state["defaultCpuSet"] == "0-3"
        assert "entries" not in state
    assert state["policyName"] == "static"

    assert pod.terminate() == 0
    assert pod.read("term") == "term"  # SIGTERM reached the pod's PID 1
    assert not container.exists()
    assert not container.parent.exists()
    assert node.state()["defaultCpuSet"] == "0-3"
    assert "entries" not in node.state()


def test_grace_then_sigkill(node: Node) -> None:
    pod = node.start("--cpus", "3", "--grace", "1", extra="trap '' TERM").wait_ready()
    start = time.monotonic()
    pod.proc.send_signal(signal.SIGTERM)
    assert pod.proc.wait(timeout=30) == 128 + signal.SIGKILL
    assert time.monotonic() - start >= 1
    assert not (pod.out / "term").exists()
    assert "grace period of 1 s over" in pod.proc.communicate()[1]
    assert node.state()["defaultCpuSet"] == "0-3"


def test_sigint_is_forwarded_as_sigterm(node: Node) -> None:
    pod = node.start("--cpus", "1").wait_ready()
    pod.proc.send_signal(signal.SIGINT)
    assert pod.proc.wait(timeout=30) == 0
    assert pod.read("term") == "term"


def test_exit_status_is_the_pods(node: Node) -> None:
    pod = node.start("--cpus", "1", cmd=["sh", "-c", "exit 42"])
    assert pod.proc.wait(timeout=30) == 42
    assert node.state()["defaultCpuSet"] == "0-3"


def test_second_pod_allocates_from_what_is_left_and_shared_pods_follow(node: Node) -> None:
    a = node.start("--cpus", "1").wait_ready()
    shared = node.start("--qos", "burstable", "--driver", "cgroupfs").wait_ready()
    shared_cg = CG / shared.read("cpuset").lstrip("/")
    assert (shared_cg / "cpuset.cpus").read_text() == "0,2-3\n"

    c = node.start("--cpus", "2-3").wait_ready()
    state = node.state()
    assert state["defaultCpuSet"] == "0"
    assert state["entries"] == {a.uid: {"compute": "1"}, c.uid: {"compute": "2-3"}}
    assert (shared_cg / "cpuset.cpus").read_text() == "0\n"

    taken = node.podsim("run", "--uid", str(uuid.uuid4()), "--cpus", "3", "--", "true")
    assert taken.returncode == 1
    assert taken.stderr == f"podsim: CPUs 3 are already allocated to pod {c.uid}\n"

    assert a.terminate() == 0
    assert node.state()["defaultCpuSet"] == "0-1"
    assert (shared_cg / "cpuset.cpus").read_text() == "0-1\n"
    assert c.terminate() == 0
    assert shared.terminate() == 0
    assert node.state()["defaultCpuSet"] == "0-3"


# Refusals that depend on the node; those of bad input alone are tested on the host
# (tests/unit/test_scripts.py): podsim checks its input before it looks at the node.
REFUSALS = [
    (["--cpus", "7"], "CPUs 7 do not exist on this node (online: 0-3)"),
    (["--cpus", "0-3"], "would leave no shared CPUs"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS)
def test_refusals_are_one_line_and_leave_nothing(node: Node, args: list[str], message: str) -> None:
    node.podsim("state")
    before_state = (node.kubelet / "cpu_manager_state").read_text()
    before_cgroups = kube_cgroups()
    uid = [] if "--uid" in args else ["--uid", str(uuid.uuid4())]
    r = node.podsim("run", *uid, *args, "--", "sleep", "600")
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("podsim: ") and message in lines[0], r.stderr
    assert (node.kubelet / "cpu_manager_state").read_text() == before_state
    assert kube_cgroups() == before_cgroups


def test_unknown_command_leaves_nothing(node: Node) -> None:
    before = kube_cgroups()
    r = node.podsim("run", "--uid", str(uuid.uuid4()), "--cpus", "1", "--", "/no/such/binary")
    assert r.returncode == 1
    assert "podsim: cannot start /no/such/binary" in r.stderr
    assert kube_cgroups() == before
    assert node.state()["defaultCpuSet"] == "0-3"


def test_systemd_removes_an_emptied_scope_cgroupfs_does_not(node: Node) -> None:
    elsewhere = CG / "podsim-test-elsewhere"
    elsewhere.mkdir()
    try:
        leave = f"echo $$ > {elsewhere}/cgroup.procs"
        sd = node.start("--cpus", "1", "--driver", "systemd", extra=leave).wait_ready()
        fs = node.start("--cpus", "2", "--driver", "cgroupfs", extra=leave).wait_ready()
        sd_scope = CG / sd.read("cpuset").lstrip("/")
        fs_dir = CG / fs.read("cpuset").lstrip("/")
        wait_for(lambda: not sd_scope.exists(), timeout=5, what="systemd to remove the scope")
        time.sleep(0.5)
        assert fs_dir.exists()
        assert sd.proc.poll() is None  # the pod itself keeps running
        assert sd.terminate() == 0 and fs.terminate() == 0
        assert not fs_dir.exists()
        assert "has no process left: removing it, as systemd does" in sd.proc.communicate()[1]
        assert "systemd" not in fs.proc.communicate()[1].split("(guaranteed, cgroupfs)")[1]
    finally:
        wait_for(lambda: (elsewhere / "cgroup.procs").read_text() == "", what="pods gone")
        elsewhere.rmdir()


def test_allocation_of_a_dead_podsim_is_reclaimed(node: Node) -> None:
    first = node.start("--cpus", "1").wait_ready()
    stale_cg = CG / first.read("cpuset").lstrip("/")
    first.proc.kill()
    first.proc.wait()
    second = node.start("--cpus", "1").wait_ready()
    assert not stale_cg.exists()
    assert node.state()["entries"] == {second.uid: {"compute": "1"}}
    assert second.terminate() == 0
    assert f"forgetting pod {first.uid}" in second.proc.communicate()[1]


def test_state_prints_kubelet_format(node: Node) -> None:
    r = node.podsim("state")
    assert r.returncode == 0
    text = r.stdout.strip()
    assert text.startswith('{"policyName":"static","defaultCpuSet":"0-3","checksum":')


def test_node_options_after_the_subcommand(node: Node, tmp_path: Path) -> None:
    other = tmp_path / "other-kubelet"
    uid = str(uuid.uuid4())
    r = node.podsim(
        "run",
        "--uid",
        uid,
        "--cpus",
        "2",
        "--kubelet-dir",
        str(other),
        "--",
        "sh",
        "-c",
        f"cat {other}/cpu_manager_state",
    )
    assert r.returncode == 0, r.stderr
    assert f'"entries":{{"{uid}":{{"compute":"2"}}}}' in r.stdout
    assert not (node.kubelet / "cpu_manager_state").exists()


# --- pods of several containers ------------------------------------------------------------

CID2 = "cd" * 32


def start_container(
    node: Node, name: str, *args: str, uid: str, extra: str = "", cmd: list[str] | None = None
) -> Pod:
    """Like node.start, for one more container of the pod `uid` (its own output directory)."""
    out = node.tmp / f"pod-{uid}-{name}"
    for n in range(2, 100):  # the same name again, after the first has gone
        if not out.exists():
            break
        out = node.tmp / f"pod-{uid}-{name}-{n}"
    out.mkdir()
    command = cmd or ["sh", "-c", POD_SCRIPT.format(extra=extra)]
    argv = [sys.executable, str(PODSIM), "run", "--uid", uid, "--container-name", name, *args]
    proc = subprocess.Popen(
        [*argv, "--", *command],
        env={**node.env(), "OUT": str(out)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pod = Pod(node, uid, out, proc)
    node.pods.append(pod)
    return pod


def cgroup_of(pod: Pod) -> Path:
    return CG / pod.read("cpuset").lstrip("/")


def pod_cgroup(uid: str, qos: str, driver: str) -> Path:
    return CG / expected_path(uid, qos, driver, "containerd").lstrip("/")


def cpus_file(cgroup: Path) -> str:
    return (cgroup / "cpuset.cpus").read_text().strip()


def one_line_refusal(r: subprocess.CompletedProcess[str], message: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("podsim: ") and message in lines[0], r.stderr


TWO = [("systemd", "guaranteed"), ("cgroupfs", "guaranteed"), ("cgroupfs", "burstable")]
TWO += [("systemd", "besteffort")]


@pytest.mark.parametrize(("driver", "qos"), TWO)
def test_two_containers_in_one_pod_first_out_then_last_out(
    node: Node, driver: str, qos: str
) -> None:
    uid = str(uuid.uuid4())
    guaranteed = qos == "guaranteed"
    opts = ["--qos", qos, "--driver", driver]
    a = node.start(
        *opts, *(["--cpus", "1"] if guaranteed else []), "--container-id", CID, uid=uid
    ).wait_ready()
    b = start_container(node, "sidecar", *opts, *(["--cpus", "2-3"] if guaranteed else []), uid=uid)
    b.wait_ready()

    # One pod cgroup, the container cgroups side by side: a's with the given id, b's generated.
    a_cg, b_cg = cgroup_of(a), cgroup_of(b)
    assert a_cg == pod_cgroup(uid, qos, driver)
    assert a_cg.parent == b_cg.parent
    leaf = r"cri-containerd-([0-9a-f]{64})\.scope" if driver == "systemd" else r"([0-9a-f]{64})"
    generated = re.fullmatch(leaf, b_cg.name)
    assert generated and generated.group(1) != CID, b_cg.name
    assert sorted(p.name for p in a_cg.parent.iterdir() if p.is_dir()) == sorted(
        [a_cg.name, b_cg.name]
    )
    # Each container's CMD is PID 1 of its own PID namespace, in its own cgroup.
    assert a.read("nspid") == b.read("nspid") == "1"
    a_init, b_init = ns_init_pid(a_cg), ns_init_pid(b_cg)
    assert os.readlink(f"/proc/{a_init}/ns/pid") != os.readlink(f"/proc/{b_init}/ns/pid")

    state = node.state()
    if guaranteed:
        assert (cpus_file(a_cg), cpus_file(b_cg)) == ("1", "2-3")
        assert state["entries"] == {uid: {"compute": "1", "sidecar": "2-3"}}
        assert state["defaultCpuSet"] == "0"
    else:
        assert (cpus_file(a_cg), cpus_file(b_cg)) == ("0-3", "0-3")
        assert "entries" not in state
        # Both shared containers follow defaultCpuSet when another pod takes CPUs.
        g = node.start("--cpus", "3").wait_ready()
        assert (cpus_file(a_cg), cpus_file(b_cg)) == ("0-2", "0-2")
        assert g.terminate() == 0
        assert (cpus_file(a_cg), cpus_file(b_cg)) == ("0-3", "0-3")

    # The first container out takes its cgroup and its entry; the other runs on untouched.
    assert a.terminate() == 0
    assert a.read("term") == "term"
    assert not a_cg.exists()
    assert b_cg.is_dir() and b.proc.poll() is None
    assert ns_init_pid(b_cg) == b_init
    state = node.state()
    if guaranteed:
        assert cpus_file(b_cg) == "2-3"
        assert state["entries"] == {uid: {"sidecar": "2-3"}}
        assert state["defaultCpuSet"] == "0-1"
    else:
        assert "entries" not in state

    # The last container out takes the pod: its cgroup and its UID in cpu_manager_state.
    assert b.terminate() == 0
    assert not b_cg.exists() and not b_cg.parent.exists()
    assert node.state()["defaultCpuSet"] == "0-3"
    assert "entries" not in node.state()
    assert not any(uid in c or uid.replace("-", "_") in c for c in kube_cgroups())
    assert "container sidecar at /" in b.proc.communicate()[1]


def test_joining_refusals_are_one_line_and_leave_the_pod_alone(node: Node) -> None:
    uid = str(uuid.uuid4())
    a = node.start("--cpus", "1", "--driver", "systemd", "--container-id", CID, uid=uid)
    a.wait_ready()
    before_state = (node.kubelet / "cpu_manager_state").read_text()
    before_cgroups = kube_cgroups()
    pid = a.proc.pid
    refusals = [
        (["--cpus", "2"], f"pod {uid} is already running container compute (podsim pid {pid})"),
        (
            ["--container-name", "compute", "--cpus", "2"],
            f"pod {uid} is already running container compute",
        ),
        (["--container-name", "b", "--cpus", "1"], f"CPUs 1 are already allocated to pod {uid}"),
        (["--container-name", "b", "--cpus", "1-2"], f"CPUs 1 are already allocated to pod {uid}"),
        (["--container-name", "b", "--cpus", "0,2-3"], "would leave no shared CPUs"),
        (["--container-name", "b", "--cpus", "4"], "CPUs 4 do not exist on this node"),
        (
            ["--container-name", "b", "--qos", "burstable"],
            f"pod {uid} runs with --qos guaranteed: container b cannot join it with --qos "
            "burstable",
        ),
        (
            ["--container-name", "b", "--cpus", "2", "--driver", "cgroupfs"],
            "runs with --driver systemd: container b cannot join it with --driver cgroupfs",
        ),
        (
            ["--container-name", "b", "--cpus", "2", "--runtime", "crio"],
            "runs with --runtime containerd",
        ),
        (
            ["--container-name", "b", "--cpus", "2", "--container-id", CID],
            f"container id {CID} is already used by container compute of pod {uid}",
        ),
    ]
    for args, message in refusals:
        default_driver = [] if "--driver" in args else ["--driver", "systemd"]
        r = node.podsim("run", "--uid", uid, *default_driver, *args, "--", "sleep", "600")
        one_line_refusal(r, message)
        assert (node.kubelet / "cpu_manager_state").read_text() == before_state, args
        assert kube_cgroups() == before_cgroups, args
        assert a.proc.poll() is None
    assert a.terminate() == 0


@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_sigkilled_container_is_cleaned_up_without_harming_the_other(
    node: Node, driver: str
) -> None:
    uid = str(uuid.uuid4())
    a = node.start("--cpus", "1", "--driver", driver, uid=uid).wait_ready()
    b = start_container(node, "sidecar", "--cpus", "2", "--driver", driver, uid=uid).wait_ready()
    a_cg, b_cg = cgroup_of(a), cgroup_of(b)
    b_init = ns_init_pid(b_cg)
    b.proc.kill()
    b.proc.wait()
    assert Path(f"/proc/{b_init}").exists()  # the container outlives its shim, as it would

    r = node.podsim("state")
    assert r.returncode == 0
    assert f"forgetting pod {uid} container sidecar: its podsim (pid {b.proc.pid}) is gone" in (
        r.stderr
    )
    assert not b_cg.exists()  # removed, so its processes were killed
    state = node.state()
    assert state["entries"] == {uid: {"compute": "1"}}
    assert state["defaultCpuSet"] == "0,2-3"
    assert a.proc.poll() is None and a_cg.is_dir() and cpus_file(a_cg) == "1"
    ns_init_pid(a_cg)

    # The pod can take a container of that name again.
    c = start_container(node, "sidecar", "--cpus", "2-3", "--driver", driver, uid=uid)
    c.wait_ready()
    assert cgroup_of(c).parent == a_cg.parent
    assert node.state()["entries"] == {uid: {"compute": "1", "sidecar": "2-3"}}
    assert c.terminate() == 0 and a.terminate() == 0
    assert not a_cg.parent.exists()
    assert node.state()["defaultCpuSet"] == "0-3"


def test_last_container_out_also_clears_a_sigkilled_sibling(node: Node) -> None:
    uid = str(uuid.uuid4())
    a = node.start("--cpus", "1", "--driver", "cgroupfs", uid=uid).wait_ready()
    b = start_container(node, "sidecar", "--cpus", "2", "--driver", "cgroupfs", uid=uid)
    b.wait_ready()
    a_cg = cgroup_of(a)
    a.proc.kill()
    a.proc.wait()
    assert b.terminate() == 0
    assert f"forgetting pod {uid} container compute" in b.proc.communicate()[1]
    assert not a_cg.exists() and not a_cg.parent.exists()
    assert node.state()["defaultCpuSet"] == "0-3"
    assert "entries" not in node.state()


def test_containers_starting_at_once_for_one_pod(node: Node) -> None:
    uid = str(uuid.uuid4())
    first = [
        start_container(node, f"c{i}", "--cpus", str(i), "--driver", "cgroupfs", uid=uid)
        for i in (1, 2, 3)
    ]
    for c in first:
        c.wait_ready()
    assert len({cgroup_of(c).parent for c in first}) == 1
    state = node.state()
    assert state["entries"] == {uid: {"c1": "1", "c2": "2", "c3": "3"}}
    assert state["defaultCpuSet"] == "0"
    for c in first:
        assert c.terminate() == 0
    assert "entries" not in node.state()

    # The same name twice at once, and the same CPU twice: one of each pair gets in.
    uid = str(uuid.uuid4())
    racers = [
        start_container(node, "x", "--cpus", "1", uid=uid),
        node.start("--container-name", "x", "--cpus", "2", uid=uid),
        start_container(node, "y", "--cpus", "3", uid=uid),
        start_container(node, "z", "--cpus", "3", uid=uid),
    ]
    wait_for(
        lambda: all(p.proc.poll() is not None or (p.out / "ready").exists() for p in racers),
        what="the four containers",
    )
    refused = [p for p in racers if p.proc.poll() is not None]
    running = [p for p in racers if p.proc.poll() is None]
    assert len(refused) == 2, [p.proc.communicate() for p in refused]
    errors = sorted(p.proc.communicate()[1] for p in refused)
    assert errors[0] == f"podsim: CPUs 3 are already allocated to pod {uid}\n"
    assert errors[1].startswith(f"podsim: pod {uid} is already running container x (")
    assert errors[1].count("\n") == 1
    entries = node.state()["entries"][uid]
    assert sorted(entries) in (["x", "y"], ["x", "z"])
    assert entries["x"] in ("1", "2") and entries[sorted(entries)[1]] == "3"
    assert node.state()["defaultCpuSet"] == {"1": "0,2", "2": "0-1"}[entries["x"]]
    for p in running:
        assert p.terminate() == 0
    assert node.state()["defaultCpuSet"] == "0-3"


def test_kept_entry_stays_until_the_pod_goes_and_its_cpus_are_reused(node: Node) -> None:
    uid = str(uuid.uuid4())
    side = node.start("--cpus", "1", "--container-name", "sidecar", uid=uid).wait_ready()
    init = start_container(node, "init", "--cpus", "2", "--keep-entry", uid=uid, cmd=["true"])
    assert init.proc.wait(timeout=30) == 0
    assert sorted(p.name for p in cgroup_of(side).parent.iterdir() if p.is_dir()) == [
        cgroup_of(side).name
    ]
    state = node.state()
    assert state["entries"] == {uid: {"init": "2", "sidecar": "1"}}
    assert state["defaultCpuSet"] == "0,3"

    # Another pod cannot have the init container's CPUs; this pod's next container can.
    taken = node.podsim("run", "--uid", str(uuid.uuid4()), "--cpus", "2", "--", "true")
    one_line_refusal(taken, f"CPUs 2 are already allocated to pod {uid}")
    app = start_container(node, "app", "--cpus", "2", uid=uid).wait_ready()
    assert cpus_file(cgroup_of(app)) == "2"
    assert node.state()["entries"] == {uid: {"app": "2", "init": "2", "sidecar": "1"}}
    assert node.state()["defaultCpuSet"] == "0,3"
    assert app.terminate() == 0
    assert node.state()["entries"] == {uid: {"init": "2", "sidecar": "1"}}
    assert node.state()["defaultCpuSet"] == "0,3"  # CPU 2 is still the init container's

    assert side.terminate() == 0
    assert "entries" not in node.state()
    assert node.state()["defaultCpuSet"] == "0-3"


def test_systemd_removes_one_containers_emptied_scope_and_keeps_the_pod(node: Node) -> None:
    elsewhere = CG / "podsim-test-elsewhere"
    elsewhere.mkdir()
    try:
        uid = str(uuid.uuid4())
        leave = f"echo $$ > {elsewhere}/cgroup.procs"
        a = node.start("--cpus", "1", "--driver", "systemd", uid=uid).wait_ready()
        b = start_container(
            node, "sidecar", "--cpus", "2", "--driver", "systemd", uid=uid, extra=leave
        ).wait_ready()
        a_cg, b_cg = cgroup_of(a), cgroup_of(b)
        wait_for(lambda: not b_cg.exists(), timeout=5, what="systemd to remove b's scope")
        time.sleep(0.5)
        assert a_cg.is_dir() and b.proc.poll() is None
        assert node.state()["entries"] == {uid: {"compute": "1", "sidecar": "2"}}
        assert b.terminate() == 0
        assert a_cg.is_dir() and a.proc.poll() is None
        assert node.state()["entries"] == {uid: {"compute": "1"}}
        assert a.terminate() == 0
        assert not a_cg.parent.exists()
    finally:
        wait_for(lambda: (elsewhere / "cgroup.procs").read_text() == "", what="pods gone")
        elsewhere.rmdir()
