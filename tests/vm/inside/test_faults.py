"""Faults around a running instance: its anchor, dnsmasq or virtiofsd killed, a vCPU moved
behind the runner's back, a storm of orphans, kubelet's state changing, missing or damaged.
Each is a row of the fault matrix (scripts/faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Fault, Node, wait_for
from .pods import (
    FLOAT,
    container_of,
    cpu_list,
    error_lines,
    events,
    float_of,
    plumbed_spec,
    pod_process,
    running,
    short_run_dir,
    start_runner,
    stop,
    tasks,
    vcpus_pinned,
)

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_anchor_killed(node: Node, tmp_path: Path, fault: Fault, driver: str) -> None:
    fault.declare(
        f"SIGKILL of the anchor ({driver} driver)",
        "anchor put back (systemd may remove the scope first); vCPUs stay pinned; stop exit 0",
    )
    rp, vcpus = running(node, tmp_path, "1-2", driver=driver)
    container = container_of(rp.pod.uid)
    (anchor,) = (container / "cgroup.procs").read_text().split()
    os.kill(int(anchor), signal.SIGKILL)

    def outcome() -> str | None:
        """ "replaced" once a new `sleep infinity` is the scope's one process, "gone" once
        the scope is (systemd may remove it, and kill a new anchor in it, first)."""
        try:
            procs = (container / "cgroup.procs").read_text().split()
            if len(procs) != 1 or procs == [anchor]:
                return None
            cmdline = Path(f"/proc/{procs[0]}/cmdline").read_bytes()
        except OSError:
            return None if container.exists() else "gone"
        # The new anchor joins the container cgroup first, then becomes `sleep infinity`.
        return "replaced" if cmdline == b"sleep\0infinity\0" else None

    result = wait_for(outcome, timeout=10, what="a new anchor or the scope's removal")
    if result == "replaced":
        fault.saw(f"anchor {anchor} replaced in the container cgroup")
    else:
        assert driver == "systemd", "only systemd removes an emptied scope"
        fault.saw("scope removed with its last process, as systemd does")
    time.sleep(1)
    assert vcpus_pinned(vcpus)
    fault.saw("vCPUs pinned")
    stop(rp, fault)


def test_vcpu_moved_behind_our_back_is_put_back(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare(
        "a vCPU's affinity changed and another vCPU moved to float, behind the runner's back",
        "drift logged, both put back within the verify interval (1 s); stop exit 0",
    )
    rp, vcpus = running(node, tmp_path, "1-2")
    first, second = vcpus
    os.sched_setaffinity(first["tid"], {0, 1, 2, 3})
    (FLOAT / "cgroup.threads").write_text(str(second["tid"]))
    assert not vcpus_pinned(vcpus)
    moved = time.monotonic()
    wait_for(lambda: vcpus_pinned(vcpus), timeout=5, what="the vCPUs to be put back")
    fault.saw(f"both put back after {time.monotonic() - moved:.1f} s")
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    drifted = {e["vcpu"] for e in events(err, "vcpu-drifted")}
    assert drifted == {0, 1}, err
    assert events(err, "exit")[0]["repins"] == 2
    fault.saw("2 vcpu-drifted + vcpu-repinned logged", f"stop: exit {code}")


def test_a_thousand_orphans_are_reaped(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare(
        "1000 orphaned children reparented to the runner (PID 1)",
        "all reaped, no zombie left; vCPUs stay pinned; stop exit 0",
    )
    rp, vcpus = running(node, tmp_path, "1-2")
    runner = rp.runner_pid()
    # Each `sleep` is started by a subshell that exits at once: 1000 orphans for the runner.
    script = "i=0; while [ $i -lt 1000 ]; do (sleep 1 &); i=$((i+1)); done"
    subprocess.run(["nsenter", "-t", str(runner), "-p", "--", "sh", "-c", script], check=True)

    def children_of_runner() -> int:
        return len(Path(f"/proc/{runner}/task/{runner}/children").read_text().split())

    start = time.monotonic()
    baseline = 2  # the anchor and QEMU
    wait_for(lambda: children_of_runner() <= baseline, timeout=120, what="the orphans' end")
    fault.saw(f"children back to {children_of_runner()} {time.monotonic() - start:.0f} s later")
    assert vcpus_pinned(vcpus)
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    reaped = events(err, "exit")[0]["orphans_reaped"]
    fault.saw(f"orphans_reaped {reaped}", f"stop: exit {code}")
    assert reaped >= 1000


def test_kubelet_moves_default_cpuset_while_running(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    fault.declare(
        "kubelet gives a shared CPU to a new pod, then takes it back (no controller)",
        "float follows defaultCpuSet within 1 s each way; vCPUs untouched; stop exit 0",
    )
    rp, vcpus = running(node, tmp_path, "1")
    qemu = pod_process(rp, "qemu-system")
    vcpu_tids = {v["tid"] for v in vcpus}

    def float_cpus() -> set[int]:
        return cpu_list((FLOAT / "cpuset.cpus").read_text())

    assert float_cpus() == {0, 2, 3}
    other = node.start("--cpus", "3").wait_ready()
    assert node.state()["defaultCpuSet"] == "0,2"
    wait_for(lambda: float_cpus() == {0, 2}, timeout=1.5, what="float to shrink")
    assert all(cpus <= {0, 2} for cpus in other_affinities(qemu, vcpu_tids))
    fault.saw("float 0,2,3 -> 0,2 with the new pod")
    assert other.terminate() == 0
    wait_for(lambda: float_cpus() == {0, 2, 3}, timeout=1.5, what="float to grow back")
    # Float's threads may use the returned CPU again (since 6.2 a grown cpuset alone does not
    # widen a thread's affinity; the runner does).
    wait_for(
        lambda: all(cpus == {0, 2, 3} for cpus in other_affinities(qemu, vcpu_tids)),
        timeout=1.5,
        what="QEMU's other threads to get CPU 3 back",
    )
    fault.saw("back to 0,2,3 when it left")
    assert vcpus_pinned(vcpus)
    stop(rp, fault)


def other_affinities(qemu: int, vcpu_tids: set[int]) -> list[set[int]]:
    """The allowed CPUs of QEMU's threads other than its vCPUs (threads come and go)."""
    found = []
    for t in tasks(qemu):
        if t not in vcpu_tids:
            try:
                found.append(os.sched_getaffinity(t))
            except OSError:
                continue
    return found


STATES = {
    "missing": None,
    "corrupt": "\x00\x17garbage{",
    "truncated": '{"policyName":"static","defaultCpuSet":"0,3","entries":{"',
    "without defaultCpuSet": '{"policyName":"static","checksum":1}',
    # A node without the static policy dedicates nothing: refused by name.
    "of policy none": '{"policyName":"none","defaultCpuSet":"","checksum":1}',
}


@pytest.mark.parametrize("kind", STATES)
def test_runner_with_a_damaged_kubelet_state(
    node: Node, tmp_path: Path, fault: Fault, kind: str
) -> None:
    text = STATES[kind]
    fault.declare(
        f"cpu_manager_state {kind} when the runner starts",
        "refused: one error line naming the file, exit 1",
    )
    kubelet = tmp_path / "damaged-kubelet"
    kubelet.mkdir()
    if text is not None:
        (kubelet / "cpu_manager_state").write_text(text)
    rp = start_runner(node, tmp_path, "1-2", "--kubelet-dir", str(kubelet))
    code, err = rp.finish()
    fault.saw(f"exit {code}")
    assert code == 1, err
    (error,) = error_lines(err)
    assert "cpu_manager_state" in error["error"]
    fault.saw(f"error: {error['error']}")


def test_dnsmasq_killed_is_restarted(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare("SIGKILL of dnsmasq", "restarted in float; the instance runs on; stop exit 0")
    rp, vcpus = running(
        node, tmp_path, "1-2", spec=plumbed_spec(tmp_path), run_dir=short_run_dir(tmp_path)
    )
    first = pod_process(rp, "dnsmasq")
    os.kill(first, signal.SIGKILL)

    def restarted() -> int | None:
        try:
            pid = pod_process(rp, "dnsmasq")
        except StopIteration:
            return None
        return pid if pid != first else None

    wait_for(restarted, timeout=10, what="a new dnsmasq")
    new = restarted()
    assert new is not None
    cgroup = Path(f"/proc/{new}/cgroup").read_text().strip()
    assert cgroup == f"0::{float_of(rp.pod.uid)}", cgroup
    fault.saw(f"dnsmasq {first} -> {new}, in float")
    assert vcpus_pinned(vcpus)
    stop(rp, fault)


def test_virtiofsd_killed_stops_the_instance(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare(
        "SIGKILL of virtiofsd",
        "instance-broken logged; QEMU stopped; exit 1; nothing left",
    )
    rp = start_runner(
        node, tmp_path, "1-2", spec=plumbed_spec(tmp_path), run_dir=short_run_dir(tmp_path)
    )
    rp.wait_ready()
    os.kill(pod_process(rp, "virtiofsd"), signal.SIGKILL)
    code, err = rp.finish()
    fault.saw(f"exit {code}")
    assert code == 1, err
    assert events(err, "instance-broken"), err
    fault.saw("instance-broken logged")
