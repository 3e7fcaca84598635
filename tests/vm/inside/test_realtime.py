"""Realtime vCPUs: the spec's `realtime` vCPUs run SCHED_FIFO at its priority, set after
pinning and before the guest runs, kept so, and refused where unsafe. Meant for Debian's
PREEMPT_RT kernel (scripts/testvm --kernel 6.12-rt); it holds on any kernel."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import Fault, Node, wait_for
from .pods import (
    INSTANCES,
    assert_nothing_left,
    assert_placed,
    cpu_list,
    error_lines,
    events,
    host_vcpus,
    pod_process,
    start_runner,
    tasks,
    write_spec,
)

SCHED_OTHER, SCHED_FIFO = 0, 1
RT_RUNTIME = Path("/proc/sys/kernel/sched_rt_runtime_us")


def sched(tid: int) -> tuple[int, int]:
    """(policy, rt_priority) as /proc shows them: fields 41 and 40 of stat."""
    fields = Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[38]), int(fields[37])


def test_realtime_vcpus_are_fifo_before_the_guest_runs(node: Node, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, vcpus=3, realtime={"vcpus": "0,2", "priority": 3})
    rp = start_runner(node, tmp_path, "1-3", "--pause-before", "cont", spec=spec)
    wait_for(
        lambda: (rp.run_dir / "paused").exists() or rp.pod.proc.poll() is not None,
        timeout=180,
        what="the runner to pause before cont",
    )
    assert rp.pod.proc.poll() is None, rp.pod.proc.communicate()[1]
    # Pinned and realtime, the guest not yet started: FIFO never runs on shared CPUs.
    instance = INSTANCES / f"instance-{rp.pod.uid}"
    vcpu_tids = [int(t) for t in (instance / "cgroup.threads").read_text().split()]
    policies = sorted(sched(t) for t in vcpu_tids)
    assert policies == [(SCHED_OTHER, 0), (SCHED_FIFO, 3), (SCHED_FIFO, 3)]
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 128 + signal.SIGTERM, err
    assert_nothing_left(rp.pod.uid)


def test_realtime_vcpus_stay_fifo_while_the_guest_runs(node: Node, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, vcpus=3, realtime={"vcpus": "0,2", "priority": 3})
    rp = start_runner(node, tmp_path, "1-3", "--verify-interval", "0.5", spec=spec)
    ready = rp.wait_ready()
    vcpus = host_vcpus(rp, ready)
    by_index = {v["vcpu"]: v for v in vcpus}
    assert {i: sched(v["tid"]) for i, v in by_index.items()} == {
        0: (SCHED_FIFO, 3),
        1: (SCHED_OTHER, 0),
        2: (SCHED_FIFO, 3),
    }
    assert {v["vcpu"]: v["fifo_priority"] for v in ready["vcpus"]} == {0: 3, 1: 0, 2: 3}
    runner = rp.runner_pid()
    assert_placed(runner, rp.pod.uid, cpu_list("1-3"), set(range(4)))
    # Nothing but the chosen vCPUs is realtime: QEMU's other threads, the runner.
    qemu = pod_process(rp, "qemu-system")
    fifo = {v["tid"] for v in vcpus if v["vcpu"] != 1}
    for pid in (qemu, runner):
        for t in tasks(pid):
            if t not in fifo:
                assert sched(t) == (SCHED_OTHER, 0), (pid, t)

    # chrt behind the runner's back: the keeper puts it back.
    tid = by_index[2]["tid"]
    subprocess.run(["chrt", "--other", "--pid", "0", str(tid)], check=True)
    assert sched(tid) == (SCHED_OTHER, 0)
    wait_for(lambda: sched(tid) == (SCHED_FIFO, 3), timeout=30, what="the keeper to restore FIFO")

    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    drifted = events(err, "vcpu-drifted")
    assert drifted and drifted[0]["vcpu"] == 2 and drifted[0]["policy"] == SCHED_OTHER
    (realtime,) = events(err, "realtime")
    assert realtime["preempt_rt"] == (
        Path("/sys/kernel/realtime").exists()
        and Path("/sys/kernel/realtime").read_text().strip() == "1"
    )
    assert_nothing_left(rp.pod.uid)


@pytest.fixture
def throttling_off() -> object:
    saved = RT_RUNTIME.read_text()
    RT_RUNTIME.write_text("-1")
    try:
        yield
    finally:
        RT_RUNTIME.write_text(saved)


@pytest.mark.fault
def test_realtime_without_rt_throttling_is_refused(
    node: Node, tmp_path: Path, fault: Fault, throttling_off: object
) -> None:
    fault.declare("realtime vCPUs, RT throttling off", "exit 1, one error line, nothing left")
    spec = write_spec(tmp_path, vcpus=2, realtime={"vcpus": "0-1"})
    rp = start_runner(node, tmp_path, "1-2", spec=spec)
    code, err = rp.finish()
    errors = error_lines(err)
    fault.saw(f"exit {code}", *(f"error: {e['error']}" for e in errors))
    assert code == 1, err
    assert len(errors) == 1 and "RT throttling is off" in errors[0]["error"], err
    assert_nothing_left(rp.pod.uid)


@pytest.mark.fault
def test_realtime_without_isolation_is_refused(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare("realtime vCPUs, --isolation off", "exit 1, one error line, nothing left")
    spec = write_spec(tmp_path, vcpus=2, realtime={"vcpus": "1"})
    rp = start_runner(node, tmp_path, "1-2", "--isolation", "off", spec=spec)
    code, err = rp.finish()
    errors = error_lines(err)
    fault.saw(f"exit {code}", *(f"error: {e['error']}" for e in errors))
    assert code == 1, err
    assert len(errors) == 1 and "need dedicated CPUs" in errors[0]["error"], err
    assert_nothing_left(rp.pod.uid)
