"""inspect's readers against this machine's /proc and a cgroup tree in a temporary directory,
and its one-line refusals. Real pods are read in the test VM (tests/vm/inside/test_inspect.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.node import podscan, procfs
from runner.node.cgroupfs import CgroupFS
from runner.node.layout import Layout

UID = "0a1b2c3d-1111-2222-3333-444455556666"


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner.cli", "inspect", *args], capture_output=True, text=True
    )


def tree(tmp: Path, threads: str = "") -> Layout:
    instance = tmp / "instances" / f"instance-{UID}"
    instance.mkdir(parents=True)
    (instance / "cgroup.threads").write_text(threads)
    (instance / "cpuset.cpus").write_text("1-2\n")
    (tmp / "instances" / "float").mkdir()
    (tmp / "instances" / "float" / "cpuset.cpus").write_text("0,3\n")
    return Layout(CgroupFS(tmp), "/instances")


def test_a_process_and_its_descendants() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        table = podscan.ProcessTable()
        assert child.pid in table.with_descendants([os.getpid()])
        (me,) = podscan.read_processes([os.getpid(), 2**22 + 1])  # the other never exists
        assert me.pid == os.getpid() and me.threads[0].tid == os.getpid()
    finally:
        child.kill()
        child.wait()


def test_a_pod_from_its_instance_cgroup(tmp_path: Path) -> None:
    """The instance cgroup's thread here is this process's: it stands in for QEMU, in no
    PID namespace of its own and without a runner for a parent, so the pod is it alone."""
    layout = tree(tmp_path, f"{os.getpid()}\n")
    ready = tmp_path / "ready"
    ready.write_text(json.dumps({"pod_uid": UID, "vcpus": [{"vcpu": 0, "tid": 7, "cpu": 2}]}))
    pod = podscan.on_node(layout, UID, ready)
    assert pod.qemu_pid == os.getpid() == pod.self_pid
    assert [p.pid for p in pod.processes] == [os.getpid()]
    assert pod.dedicated == {1, 2} and pod.float_cpus == {0, 3}
    assert pod.instance_cgroup == f"/instances/instance-{UID}"
    assert pod.vcpu_cpus == {0: 2} and pod.vcpu_tids == {}  # the ready file's TIDs are not ours


def test_an_instance_cgroup_without_threads(tmp_path: Path) -> None:
    pod = podscan.on_node(tree(tmp_path), UID)
    assert pod.qemu_pid is None and pod.processes == ()
    assert any("holds no thread" in n for n in pod.notes)


def test_refusals_are_one_line(tmp_path: Path) -> None:
    tree(tmp_path)
    where = ["--cgroup-mount", str(tmp_path), "--cgroup-root", str(tmp_path / "instances")]
    other = UID.replace("6666", "7777")
    r = inspect("--pod", other, *where)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"instance-runner: no instance cgroup for pod {other} "
        f"(no {tmp_path}/instances/instance-{other})\n"
    )
    r = inspect("--pod", "../float", *where)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a pod UID" in r.stderr

    r = inspect("--cgroup-mount", str(tmp_path), "--cgroup-root", str(tmp_path / "none"))
    assert r.returncode == 1 and "does not exist: no instance has run" in r.stderr

    r = inspect("--run-dir", str(tmp_path / "run"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "ready does not exist: the instance is not running" in r.stderr
    (tmp_path / "run").mkdir()
    ready = tmp_path / "run" / "ready"
    ready.write_text(json.dumps({"instance_cgroup": None, "qemu_pid": 5}))
    r = inspect("--run-dir", str(tmp_path / "run"))
    assert r.returncode == 1 and "isolation off" in r.stderr
    ready.write_text(json.dumps({"instance_cgroup": "/i", "qemu_pid": 2**22 + 1}))
    r = inspect("--run-dir", str(tmp_path / "run"))
    assert r.returncode == 1 and "is not in this PID namespace's /proc" in r.stderr


@pytest.mark.parametrize("env", [False, True])
def test_the_run_dir_from_the_environment(tmp_path: Path, env: bool) -> None:
    """An exec'd process inherits the container's environment, INSTANCE_RUNNER_RUN_DIR too."""
    args = [] if env else ["--run-dir", str(tmp_path)]
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "inspect", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "INSTANCE_RUNNER_RUN_DIR": str(tmp_path)},
    )
    assert r.returncode == 1 and f"{tmp_path}/ready does not exist" in r.stderr


def test_the_main_thread_first_after_the_pid_counter_wrapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread started after the counter wrapped has a lower TID than its process."""
    monkeypatch.setattr(procfs.os, "listdir", lambda path: ["6229", "27637", "6230", "27640"])
    assert procfs.threads(27637) == [27637, 6229, 6230, 27640]
