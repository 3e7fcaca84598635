"""podsim inside the test VM: kubelet's paths and files, signals, allocation, refusals."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from .conftest import CG, Node, kube_cgroups, ns_init_pid, wait_for

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


REFUSALS = [
    (["--cpus", "7"], "CPUs 7 do not exist on this node (online: 0-3)"),
    (["--cpus", "0-3"], "would leave no shared CPUs"),
    (["--cpus", "3-1"], "invalid CPU range"),
    (["--cpus", "1,1-2"], "names CPUs 1 twice"),
    (["--cpus", "one"], "invalid CPU list"),
    (["--qos", "burstable", "--cpus", "1"], "--cpus is only for Guaranteed pods"),
    ([], "--cpus is required for a Guaranteed pod"),
    (["--cpus", "1", "--container-id", "xyz"], "--container-id must be 64 lowercase hex"),
    (["--cpus", "1", "--uid", "../../etc"], "is not a pod UID"),
    (["--cpus", "1", "--bogus"], "unrecognized arguments: --bogus"),
    (["--cpus", "1", "--qos", "platinum"], "invalid choice"),
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


def test_missing_cmd(node: Node) -> None:
    for argv in (
        ["run", "--uid", str(uuid.uuid4()), "--cpus", "1"],
        ["run", "--uid", str(uuid.uuid4()), "--cpus", "1", "--"],
    ):
        r = node.podsim(*argv)
        assert r.returncode != 0
        assert r.stderr.startswith("podsim: missing CMD") and r.stderr.count("\n") == 1


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
