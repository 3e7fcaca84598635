"""`<root>`'s cpu.weight under a busy shared pool: the VM pods' helpers in float get the share
kubelet would give the VM pods, against kubepods, which kubelet weighs for the whole node.
Needs 8 CPUs (the topology test VM): with fewer, kubelet's weight for the pods is below the
default of 100 and nothing changes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .conftest import Node, wait_for
from .pods import FLOAT, INSTANCES, assert_nothing_left, container_of, start_runner, write_spec

NOISE = "while :; do :; done"


def run_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def test_float_helpers_get_the_vm_pods_share_of_a_busy_shared_pool(
    node: Node, tmp_path: Path
) -> None:
    cpus = os.cpu_count() or 0
    assert cpus == 8, "needs the 8-CPU test VM"
    spec = write_spec(tmp_path, vcpus=7)
    rp = start_runner(node, tmp_path, "1-7", spec=spec)  # CPU 0 is the shared pool
    rp.wait_ready()
    kubepods = container_of(rp.pod.uid).parent.parent
    # kubelet: kubepods for 8 allocatable CPUs, the VM pod for its 7.
    assert (kubepods / "cpu.weight").read_text().strip() == "313"
    assert (INSTANCES / "cpu.weight").read_text().strip() == "274"

    # A busy Burstable pod on the shared CPU, and a busy helper of the VM pod in float.
    noisy = node.start("--qos", "burstable", cmd=["sh", "-c", NOISE])
    noisy_pid = wait_for(lambda: noisy_shell(noisy.proc.pid), timeout=60, what="the noisy pod")
    helper = subprocess.Popen(["sh", "-c", NOISE])
    try:
        (FLOAT / "cgroup.procs").write_text(str(helper.pid))
        assert os.sched_getaffinity(helper.pid) == {0}
        time.sleep(1)
        h0, n0, t0 = run_ns(helper.pid), run_ns(noisy_pid), time.monotonic()
        time.sleep(6)
        h1, n1, elapsed = run_ns(helper.pid), run_ns(noisy_pid), time.monotonic() - t0
    finally:
        helper.kill()
        helper.wait()
    share = (h1 - h0) / ((h1 - h0) + (n1 - n0))
    # By the weights: 274 / (274 + 313) = 0.47. At the default weight of 100 it would be
    # 100 / (100 + 313) = 0.24.
    assert 0.35 < share < 0.6, (share, elapsed)

    noisy.proc.send_signal(signal.SIGTERM)
    noisy.proc.wait(timeout=60)
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    assert_nothing_left(rp.pod.uid)


def noisy_shell(podsim_pid: int) -> int | None:
    """The busy shell the noisy pod's podsim started."""
    children = Path(f"/proc/{podsim_pid}/task/{podsim_pid}/children").read_text().split()
    return int(children[0]) if children else None
