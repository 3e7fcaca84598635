"""instance-runner as a pod's PID 1 (under podsim) with a firmware-only guest: the pinning
invariants, stopping, QEMU dying, orphans, and every refusal leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from .conftest import Fault, Node, wait_for
from .pods import (
    RUNNER,
    assert_nothing_left,
    assert_placed,
    comm,
    cpu_list,
    error_lines,
    fake_qemu,
    pod_processes,
    start_runner,
    write_spec,
)

# --- the invariants ------------------------------------------------------------------------


@pytest.mark.parametrize(("cpus", "driver"), [("1-2", "systemd"), ("1,3", "cgroupfs")])
def test_pinning_invariants_and_clean_stop(
    node: Node, tmp_path: Path, cpus: str, driver: str
) -> None:
    rp = start_runner(node, tmp_path, cpus, driver=driver)
    ready = rp.wait_ready()
    uid = rp.pod.uid
    pod_cpus = cpu_list(cpus)
    runner = rp.runner_pid()
    ns = os.readlink(f"/proc/{runner}/ns/pid")
    assert_placed(runner, uid, pod_cpus, set(range(4)))

    # The guest never ran before it was pinned.
    assert ready["status_at_pin"] in ("prelaunch", "paused")
    # A vCPU thread's own start-up (TCG's per-thread set-up) is counted too and takes a few
    # ticks on a loaded host; the firmware running unpinned would take far more.
    ticks = ready["vcpu_ticks_before_cont"]
    assert all(t <= 5 for t in ticks.values()), ticks
    assert {v["cpu"] for v in ready["vcpus"]} == pod_cpus

    # SIGTERM: a clean stop. A firmware-only guest has no OS to power off, so the runner
    # quits QEMU at once (exit 0, not 124 after the shutdown timeout), well before podsim's
    # 30 s grace would SIGKILL it (137).
    pids = pod_processes(ns)
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert not rp.ready_file.exists()
    assert '"event": "exit", "code": 0' in err
    assert_nothing_left(uid)


@pytest.mark.fault
def test_qemu_killed_means_teardown_and_137(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare("SIGKILL of QEMU", "teardown, exit 137, nothing left")
    rp = start_runner(node, tmp_path, "2")
    rp.wait_ready()
    runner = rp.runner_pid()
    ns = os.readlink(f"/proc/{runner}/ns/pid")
    qemu = next(p for p in pod_processes(ns) if comm(int(p)).startswith("qemu-system"))
    os.kill(qemu, signal.SIGKILL)
    code, err = rp.finish()
    fault.saw(f"exit {code}")
    assert code == 137, err
    assert_nothing_left(rp.pod.uid)


def test_orphans_are_reaped(node: Node, tmp_path: Path) -> None:
    rp = start_runner(node, tmp_path, "2")
    rp.wait_ready()
    runner = rp.runner_pid()
    # A process in the pod whose parent exits: its child is reparented to the runner (PID 1).
    os.system(f"nsenter -t {runner} -p -- sh -c 'sleep 0.3 & exit 0'")
    time.sleep(1.5)
    zombies = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        if f"PPid:\t{runner}\n" in status and "State:\tZ" in status:
            zombies.append(p)
    assert zombies == []
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0
    exit_line = json.loads(next(line for line in err.splitlines() if '"event": "exit"' in line))
    assert exit_line["orphans_reaped"] >= 1


# --- refusals and faults: one line, non-zero, nothing left ----------------------------------


FAULTS = {
    "malformed spec": (lambda t: t / "bad.json", "{", "is not valid JSON"),
    "unknown field": (None, {"vcpu": 2}, "unknown field(s) vcpu"),
    "too many vcpus": (None, {"vcpus": 3}, "asks for 3 vCPUs but the pod has 2"),
    "missing qemu": (None, {"qemu_binary": "/nonexistent/qemu"}, "not found"),
    "qemu exits": ("exit", {}, "QEMU exited during start-up with code 3: boom"),
    "qmp silent": ("silent", {}, "did not answer on QMP"),
}


@pytest.mark.fault
@pytest.mark.parametrize("case", FAULTS)
def test_start_up_faults(node: Node, tmp_path: Path, case: str, fault: Fault) -> None:
    kind, fields, message = FAULTS[case]
    fault.declare(f"start-up: {case}", f"exit 1, one error line: ...{message}...")
    if case == "malformed spec":
        spec = tmp_path / "bad.json"
        spec.write_text(str(fields))
    else:
        extra = dict(fields) if isinstance(fields, dict) else {}
        if kind == "exit":
            extra["qemu_binary"] = str(fake_qemu(tmp_path, "echo boom >&2; exit 3"))
        elif kind == "silent":
            extra["qemu_binary"] = str(fake_qemu(tmp_path, "exec sleep 600"))
        spec = write_spec(tmp_path, **extra)
    rp = start_runner(node, tmp_path, "1-2", "--qmp-timeout", "3", spec=spec)
    code, err = rp.finish()
    errors = error_lines(err)
    fault.saw(f"exit {code}", *(f"error: {e['error']}" for e in errors))
    assert code == 1, err
    assert len(errors) == 1 and message in errors[0]["error"], err
    assert_nothing_left(rp.pod.uid)


@pytest.mark.fault
def test_not_root(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare("runner not root", "exit 1, one error line")
    # The checkout may sit below a 0700 home directory: inside the VM (writes stay in its
    # overlay) let the unprivileged user reach the runner and its interpreter.
    for leaf in (tmp_path, Path(RUNNER), Path(os.path.realpath(sys.executable))):
        for d in [leaf, *leaf.parents] if leaf.is_dir() else leaf.parents:
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                d.chmod(mode | stat.S_IXOTH | (stat.S_IROTH if d == tmp_path else 0))
    rp = start_runner(
        node,
        tmp_path,
        "1-2",
        prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
    )
    code, err = rp.finish()
    fault.saw(f"exit {code}", *(f"error: {e['error']}" for e in error_lines(err)))
    assert code == 1
    (error,) = error_lines(err)
    assert "must run as root" in error["error"]
    assert_nothing_left(rp.pod.uid)


@pytest.mark.fault
def test_not_cgroup_v2(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare("cgroup mount is not cgroup v2", "exit 1, one error line")
    fake_mount = tmp_path / "cgroup"
    fake_mount.mkdir()
    rp = start_runner(
        node,
        tmp_path,
        "1-2",
        "--cgroup-mount",
        str(fake_mount),
        "--cgroup-root",
        str(fake_mount / "instances"),
    )
    code, err = rp.finish()
    fault.saw(f"exit {code}", *(f"error: {e['error']}" for e in error_lines(err)))
    assert code == 1
    (error,) = error_lines(err)
    assert "is not a cgroup v2 (unified) hierarchy" in error["error"]
    assert_nothing_left(rp.pod.uid)


@pytest.mark.parametrize(
    "step", ["anchor", "cgroups", "float", "plumbing", "qemu", "qmp", "pin", "cont"]
)
@pytest.mark.fault
def test_sigterm_at_each_start_up_step(node: Node, tmp_path: Path, step: str, fault: Fault) -> None:
    fault.declare(f"SIGTERM before start-up step {step!r}", "exit 143, nothing left")
    rp = start_runner(node, tmp_path, "1-2", "--pause-before", step)
    wait_for(
        lambda: (rp.run_dir / "paused").exists() or rp.pod.proc.poll() is not None,
        timeout=60,
        what=f"the runner to pause before {step}",
    )
    assert rp.pod.proc.poll() is None, rp.pod.proc.communicate()[1]
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    fault.saw(f"exit {code}")
    assert code == 128 + signal.SIGTERM, err
    assert '"event": "startup-interrupted"' in err
    assert not (rp.run_dir / "paused").exists()
    assert_nothing_left(rp.pod.uid)


@pytest.mark.fault
def test_second_sigterm_does_not_skip_cleanup(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare(
        "second SIGTERM during teardown (guest ignores the power button)",
        "logged and ignored; quit after the timeout; exit 124; nothing left",
    )
    # An empty disk: the guest "boots an OS" as far as the runner knows, but its firmware finds
    # nothing to run and never answers the power button, so teardown waits the full timeout.
    disk = tmp_path / "empty.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    spec = write_spec(tmp_path, disks=[{"path": str(disk)}])
    rp = start_runner(node, tmp_path, "1-2", "--shutdown-timeout", "3", spec=spec)
    rp.wait_ready()
    runner = rp.runner_pid()
    rp.pod.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    os.kill(runner, signal.SIGTERM)  # straight to the runner, during its teardown
    code, err = rp.finish()
    fault.saw(f"exit {code}")
    assert code == 124, err  # quit after the power button went unanswered, cleanup complete
    assert "stop-already-in-progress" in err
    assert '"how": "quit"' in err
    assert_nothing_left(rp.pod.uid)
