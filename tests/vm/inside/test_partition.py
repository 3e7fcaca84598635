"""`--partition isolated`: the instance CPUs become an isolated cpuset partition while the
guest runs (kernel 6.7+), out of the scheduler's domains, and are given back on stop with
kubelet's view (the container's cpuset.cpus) untouched. Older kernels run without one, after
one warning. Embedded mode and controller mode."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .conftest import CG, Fault, Node
from .pods import (
    INSTANCES,
    Daemon,
    assert_nothing_left,
    assert_placed,
    container_of,
    cpu_list,
    error_lines,
    events,
    start,
    start_runner,
)

SUPPORTED = (CG / "cpuset.cpus.isolated").exists()  # 6.7+


def domains() -> dict[int, int]:
    """CPU -> how many scheduler domains it is in, from /proc/schedstat: an isolated CPU is in
    none (no load balancing)."""
    count: dict[int, int] = {}
    cpu = -1
    for line in Path("/proc/schedstat").read_text().splitlines():
        word = line.split(" ", 1)[0]
        if word.startswith("cpu"):
            cpu = int(word[3:])
            count[cpu] = 0
        elif word.startswith("domain"):
            count[cpu] += 1
    return count


def read(path: Path) -> str:
    return path.read_text().strip()


def assert_isolated(uid: str, pod_cpus: set[int]) -> None:
    instance = INSTANCES / f"instance-{uid}"
    container = container_of(uid)
    assert read(instance / "cpuset.cpus.partition") == "isolated"
    assert cpu_list(read(CG / "cpuset.cpus.isolated")) == pod_cpus
    assert cpu_list(read(INSTANCES / "cpuset.cpus.exclusive")) == pod_cpus
    found = domains()
    assert all(found[c] == 0 for c in pod_cpus), found
    assert all(found[c] > 0 for c in set(found) - pod_cpus), found
    # kubelet's view stays: the container's cpuset.cpus; only its effective CPUs move to the
    # shared pool while the partition holds the dedicated ones.
    assert cpu_list(read(container / "cpuset.cpus")) == pod_cpus
    assert not cpu_list(read(container / "cpuset.cpus.effective")) & pod_cpus


def kubepods_cpus(uid: str) -> set[int]:
    """The CPUs kubepods (the pod's parent's parent) may use now."""
    return cpu_list(read(container_of(uid).parent.parent / "cpuset.cpus.effective"))


def test_isolated_partition_embedded(node: Node, tmp_path: Path) -> None:
    rp = start_runner(node, tmp_path, "1-2", "--partition", "isolated")
    rp.wait_ready()
    uid, pod_cpus = rp.pod.uid, {1, 2}
    container = container_of(uid)
    kubepods = container.parent.parent
    assert_placed(rp.runner_pid(), uid, pod_cpus, set(range(4)))
    if SUPPORTED:
        assert_isolated(uid, pod_cpus)
        assert not kubepods_cpus(uid) & pod_cpus
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    if SUPPORTED:
        assert len(events(err, "partition-isolated")) == 1
        assert len(events(err, "partition-undone")) == 1
        assert '"event": "partition-undo-failed"' not in err
        assert read(CG / "cpuset.cpus.isolated") == ""
        assert read(INSTANCES / "cpuset.cpus.exclusive") == ""
        assert all(n > 0 for n in domains().values()), domains()
    else:
        (warning,) = events(err, "partition-unsupported")
        assert "6.7+" in warning["detail"]
    assert cpu_list(read(kubepods / "cpuset.cpus.effective")) == set(range(4))
    assert_nothing_left(uid)


def test_isolated_partition_from_the_controller(node: Node, tmp_path: Path) -> None:
    daemon = Daemon(node, tmp_path)
    daemon.extra = ("--partition", "isolated")
    daemon.start()
    try:
        one = start(node, tmp_path, daemon, "1", "one")
        two = start(node, tmp_path, daemon, "2-3", "two")
        one.wait_ready()
        two.wait_ready()
        for rp, pod_cpus in ((one, {1}), (two, {2, 3})):
            # float is every CPU but both pods'
            assert_placed(rp.runner_pid(), rp.pod.uid, pod_cpus, {0} | pod_cpus)
        if SUPPORTED:
            assert cpu_list(read(CG / "cpuset.cpus.isolated")) == {1, 2, 3}
            assert read(INSTANCES / f"instance-{one.pod.uid}" / "cpuset.cpus.partition") == (
                "isolated"
            )
            assert all(domains()[c] == 0 for c in (1, 2, 3))
        # One pod stops: its CPU goes back, the other's stay isolated.
        one.pod.proc.send_signal(signal.SIGTERM)
        code, err = one.finish()
        assert code == 0, err
        assert not (INSTANCES / f"instance-{one.pod.uid}").exists()
        if SUPPORTED:
            assert cpu_list(read(CG / "cpuset.cpus.isolated")) == {2, 3}
            assert cpu_list(read(INSTANCES / "cpuset.cpus.exclusive")) == {2, 3}
            assert domains()[1] > 0
            assert kubepods_cpus(two.pod.uid) == {0, 1}
        # kubelet's view of the running pod: its cpuset.cpus, never rewritten.
        assert cpu_list(read(container_of(two.pod.uid) / "cpuset.cpus")) == {2, 3}
        two.pod.proc.send_signal(signal.SIGTERM)
        code, err = two.finish()
        assert code == 0, err
        assert_nothing_left(one.pod.uid)
        assert_nothing_left(two.pod.uid)
        if SUPPORTED:
            assert read(CG / "cpuset.cpus.isolated") == ""
            assert read(INSTANCES / "cpuset.cpus.exclusive") == ""
            assert all(n > 0 for n in domains().values()), domains()
    finally:
        assert daemon.stop() == 0
    log = daemon.log.read_text()
    if SUPPORTED:
        assert log.count('"event": "partition-isolated"') == 2, log
    else:
        assert '"event": "partition-unsupported"' in log


@pytest.mark.fault
def test_cpus_held_exclusively_elsewhere_are_refused(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    if not SUPPORTED:
        pytest.skip("no isolated partitions before 6.7")
    fault.declare(
        "--partition isolated, the CPUs already exclusive to another cgroup",
        "exit 1, one error line naming the file, errno and rule; nothing left",
    )
    (CG / "cgroup.subtree_control").write_text("+cpuset")
    other = CG / "other-partition"
    other.mkdir()
    try:
        (other / "cpuset.cpus.exclusive").write_text("2")
        rp = start_runner(node, tmp_path, "1-2", "--partition", "isolated")
        code, err = rp.finish()
        errors = error_lines(err)
        fault.saw(f"exit {code}", *(f"error: {e['error']}" for e in errors))
        assert code == 1, err
        (error,) = errors
        assert "isolated partition" in error["error"] and "cpuset.cpus.exclusive" in error["error"]
        assert "EINVAL" in error["error"] and "cgroup-v2.rst" in error["error"]
        assert read(INSTANCES / "cpuset.cpus.exclusive") == ""
        assert read(CG / "cpuset.cpus.isolated") == ""
        assert_nothing_left(rp.pod.uid)
    finally:
        other.rmdir()
