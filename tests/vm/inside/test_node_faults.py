"""Faults that cross pods and the node: a runner SIGKILLed in embedded mode, kubelet's state
file gone, pods with several containers, a controller that drops connections, a SIGTERM
while the runner imports, pods sharing the default run dir, a runner that is not PID 1,
processes exec'd into the pod, and float growing on kernels that keep thread affinity.
Each is a row of the fault matrix (scripts/faults)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Fault, Node, wait_for
from .pods import (
    FLOAT,
    INSTANCES,
    UNPRIVILEGED_POD,
    Daemon,
    RunnerPod,
    comm,
    container_of,
    cpu_list,
    error_lines,
    events,
    float_cpus,
    host_vcpus,
    pod_processes,
    start,
    start_runner,
    stop,
    vcpus_pinned,
    write_spec,
)

pytestmark = pytest.mark.fault

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"]


def one_vcpu(tmp: Path, name: str) -> Path:
    work = tmp / name
    work.mkdir()
    return write_spec(work, vcpus=1, name=name)


def qemus_of(rp: RunnerPod) -> list[int]:
    ns = os.readlink(f"/proc/{rp.runner_pid()}/ns/pid")
    return [p for p in pod_processes(ns) if comm(p).startswith("qemu-system")]


def float_threads_allowed() -> list[set[int]]:
    """Every thread of float and of the pods' parts of it."""
    found = []
    threads = [FLOAT / "cgroup.threads", *FLOAT.glob("pod-*/cgroup.threads")]
    for t in (tid for f in threads for tid in f.read_text().split()):
        try:
            found.append(os.sched_getaffinity(int(t)))
        except OSError:
            continue
    return found


# --- 1. embedded mode: a SIGKILLed runner's instance cgroup ------------------------------------


def test_sigkilled_embedded_runner_leaves_no_cpus_out_of_float(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    fault.declare(
        "runner SIGKILLed in embedded mode",
        "its instance cgroup removed by the next resync once kubelet drops the pod; float back "
        "to kubelet's shared set; the pod restarts on the same CPUs",
    )
    a = start_runner(node, tmp_path, "1-2")
    a.wait_ready()
    b = start_runner(node, tmp_path, "3", spec=one_vcpu(tmp_path, "b"), run_dir=tmp_path / "rb")
    b.wait_ready()
    assert float_cpus() == {0}
    os.kill(a.runner_pid(), signal.SIGKILL)
    a.finish()
    # kubelet (podsim) drops the pod; the live runner b removes a's cgroup and float grows.
    wait_for(
        lambda: float_cpus() == {0, 1, 2} and not (INSTANCES / f"instance-{a.pod.uid}").exists(),
        timeout=15,
        what="float back to 0-2",
    )
    fault.saw("after SIGKILL: instance cgroup removed, float 0-2")
    (tmp_path / "again").mkdir()
    again = start_runner(node, tmp_path / "again", "1-2", uid=a.pod.uid)
    again.wait_ready()
    assert float_cpus() == {0}
    fault.saw("restart on 1-2 ready, float 0")
    stop(again, fault)
    stop(b, fault)


def test_stale_instance_left_by_a_sigkill_goes_at_the_next_start(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    fault.declare(
        "runner SIGKILLed in embedded mode, no other runner on the node",
        "the next runner's start removes the stale cgroup; float = kubelet's shared set",
    )
    a = start_runner(node, tmp_path, "1-2")
    a.wait_ready()
    os.kill(a.runner_pid(), signal.SIGKILL)
    a.finish()
    assert (INSTANCES / f"instance-{a.pod.uid}").exists()
    b = start_runner(node, tmp_path, "3", spec=one_vcpu(tmp_path, "b"), run_dir=tmp_path / "rb")
    ready = b.wait_ready()
    assert cpu_list(ready["float_cpus"]) == {0, 1, 2}
    assert not (INSTANCES / f"instance-{a.pod.uid}").exists()
    fault.saw(f"next start: float {ready['float_cpus']}, stale cgroup gone")
    stop(b, fault)


# --- 2. kubelet's state file missing -----------------------------------------------------------


def test_missing_state_never_puts_another_pods_cpu_into_float(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    fault.declare(
        "cpu_manager_state deleted while running, another pod on CPU 3 (embedded)",
        "float kept as it is (0); a start with the file missing is refused in one line",
    )
    other = node.start("--cpus", "3", cmd=SLEEPER)
    rp = start_runner(node, tmp_path, "1-2")
    rp.wait_ready()
    state_file = node.kubelet / "cpu_manager_state"
    good = state_file.read_text()
    state_file.unlink()
    time.sleep(2.5)  # the watch's event, and more
    assert float_cpus() == {0}, "another pod's exclusive CPU went into float"
    fault.saw(f"running: float {sorted(float_cpus())}")
    state_file.write_text(good)
    stop(rp, fault)
    other.terminate()
    # At start, with the file gone: one line, exit 1 (another kubelet dir: podsim keeps its own).
    empty = tmp_path / "no-kubelet"
    empty.mkdir()
    (tmp_path / "second").mkdir()
    starter = start_runner(node, tmp_path / "second", "1-2", "--kubelet-dir", str(empty))
    code, err = starter.finish()
    assert code == 1, err
    (error,) = error_lines(err)
    assert "cpu_manager_state is missing" in error["error"], error
    fault.saw(f"start refused: {error['error']}")


def test_missing_state_in_controller_mode(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "cpu_manager_state deleted while running, another pod on CPU 3 (controller)",
        "float kept as it is (0); the controller serves on",
    )
    other = node.start("--cpus", "3", cmd=SLEEPER)
    pod = start(node, tmp_path, daemon, "1-2", "m")
    pod.wait_ready()
    state_file = node.kubelet / "cpu_manager_state"
    good = state_file.read_text()
    state_file.unlink()
    time.sleep(3)  # an event and a periodic resync (2 s)
    assert float_cpus() == {0}
    assert daemon.call("health")["result"]["status"] == "ok"
    fault.saw(f"float {sorted(float_cpus())}, controller serving")
    state_file.write_text(good)
    assert pod.pod.terminate() == 0
    other.terminate()


# --- 3. pods with several containers -------------------------------------------------------


@pytest.mark.parametrize("other", ["sidecar", "init-leftover"])
def test_controller_accepts_the_vm_container_beside_others(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault, other: str
) -> None:
    fault.declare(
        f"a pod with an {other} holding exclusive CPUs (controller)",
        "the VM container's own entry is checked; registered and pinned",
    )
    work = tmp_path / "vm"
    work.mkdir()
    uid = "0a1b2c3d-1111-2222-3333-" + os.urandom(6).hex()
    if other == "sidecar":
        side = node.start("--container-name", "sidecar", "--cpus", "3", uid=uid, cmd=SLEEPER)
        wait_for(lambda: _listed(node, uid), what="the sidecar")
    else:
        # A container that keeps the pod, and an init container whose entry kubelet keeps.
        side = node.start("--container-name", "holder", "--cpus", "3", uid=uid, cmd=SLEEPER)
        wait_for(lambda: _listed(node, uid), what="the holder")
        init = node.start(
            "--container-name", "init", "--cpus", "1-2", "--keep-entry", uid=uid, cmd=["true"]
        )
        assert init.proc.wait(timeout=30) == 0
    rp = start_runner(
        node,
        work,
        "1-2",
        "--controller-socket",
        str(daemon.socket),
        "--controller-timeout",
        "20",
        uid=uid,
        podsim=UNPRIVILEGED_POD,
    )
    ready = rp.wait_ready()
    entries = node.state()["entries"][uid]
    assert len(entries) == (2 if other == "sidecar" else 3), entries
    fault.saw(f"entries {entries}; ready on {[v['cpu'] for v in ready['vcpus']]}")
    assert rp.pod.terminate() == 0
    if side is not None:
        side.terminate()


def _listed(node: Node, uid: str) -> bool:
    try:
        return uid in node.state().get("entries", {})
    except (OSError, ValueError):
        return False


# --- 4. a controller that drops connections ----------------------------------------------------


@pytest.fixture
def dropping_socket() -> Iterator[Path]:
    """A socket that accepts and resets every connection (a full or restarting controller)."""
    path = Path(f"/run/drop-{os.getpid()}.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            time.sleep(0.01)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()
    server.close()
    path.unlink()


def test_connection_reset_is_retried_like_an_absent_controller(
    node: Node, tmp_path: Path, dropping_socket: Path, fault: Fault
) -> None:
    fault.declare(
        "controller accepts and resets every connection",
        "retried until --controller-timeout, then exit 1 with one line (never 70)",
    )
    rp = start_runner(
        node,
        tmp_path,
        "1-2",
        "--controller-socket",
        str(dropping_socket),
        "--controller-timeout",
        "3",
        podsim=UNPRIVILEGED_POD,
    )
    code, err = rp.finish()
    fault.saw(f"exit {code}")
    assert code == 1, err
    assert not events(err, "internal-error")
    (error,) = error_lines(err)
    assert "no answer from the controller" in error["error"], error
    assert len(events(err, "controller-retry")) >= 2
    fault.saw(f"error: {error['error']}")


# --- 5. SIGTERM while the runner is still importing --------------------------------------------


def sigterm_caught(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def is_runner(pid: int) -> bool:
    """The runner itself, not a fork of its parent that has yet to exec it."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"/instance-runner") for a in argv[:2])


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_sigterm_during_imports_is_not_lost(
    node: Node, tmp_path: Path, fault: Fault, delay: float
) -> None:
    fault.declare(
        f"SIGTERM {delay:g} s after the runner's first handler is in (imports still running)",
        "remembered; exit 143 at once; nothing left",
    )
    rp = start_runner(node, tmp_path, "1-2", podsim=("--grace", "60"))
    pid = wait_for(
        lambda: next((p for p in _children(rp.pod.proc.pid) if is_runner(p)), None),
        what="the runner's exec",
    )
    wait_for(lambda: sigterm_caught(pid), timeout=30, what="a SIGTERM handler")
    time.sleep(delay)
    sent = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    code, err = rp.finish(timeout=50)
    took = time.monotonic() - sent
    fault.saw(f"exit {code} {took:.1f} s after SIGTERM")
    assert code == 128 + signal.SIGTERM, err
    assert took < 30, "the pod ran on as if the SIGTERM was lost"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# --- 8. two pods with the default run dir ----------------------------------------------------


def test_two_pods_with_the_default_run_dir_share_nothing(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    fault.declare(
        "two pods, both with the default --run-dir",
        "one run dir per pod, each with its own ready file, both removed at stop",
    )
    a = start_runner(node, tmp_path, "1", spec=one_vcpu(tmp_path, "a"), default_run_dir=True)
    b = start_runner(node, tmp_path, "2", spec=one_vcpu(tmp_path, "b"), default_run_dir=True)
    ready = {}
    for rp in (a, b):
        rp.run_dir = Path("/run/instance-runner") / rp.pod.uid
        ready[rp.pod.uid] = rp.wait_ready()
    assert {r["name"] for r in ready.values()} == {"a", "b"}
    fault.saw("two ready files: " + ", ".join(f"{u[:8]}…/ready" for u in ready))
    stop(a, fault)
    stop(b, fault)
    assert not a.run_dir.exists() and not b.run_dir.exists()


# --- 9. a runner that is not PID 1 -------------------------------------------------------------


def test_sigkilled_runner_that_is_not_pid_1_leaves_no_qemu(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    fault.declare(
        "runner not PID 1 (shareProcessNamespace), SIGKILLed",
        "QEMU and every helper die with it; the stale instance cgroup is left to the next resync",
    )
    # PID 1 stays: were it to exit, the kernel would end the namespace and hide the fault.
    keep = 'trap "exit 0" TERM; "$@" & while :; do sleep 0.1; done'
    rp = start_runner(node, tmp_path, "1-2", wrap=("sh", "-c", keep, "sh"))
    wait_for(lambda: rp.ready_file.exists() or rp.pod.proc.poll() is not None, timeout=60)
    init = rp.runner_pid()
    (runner,) = [p for p in _children(init) if is_runner(p)]
    ns = os.readlink(f"/proc/{runner}/ns/pid")
    assert len([p for p in pod_processes(ns) if comm(p).startswith("qemu-system")]) == 1
    os.kill(runner, signal.SIGKILL)
    wait_for(
        lambda: not [p for p in pod_processes(ns) if p != init and not _init_sleep(p)],
        timeout=10,
        what="the runner's children to die with it",
    )
    fault.saw("after SIGKILL: no QEMU, no helper")
    code = rp.pod.terminate()
    fault.saw(f"pod exit {code}")
    instance = INSTANCES / f"instance-{rp.pod.uid}"
    assert (instance / "cgroup.threads").read_text() == ""
    instance.rmdir()  # what the next runner's resync would do (the tests above show it)


def _init_sleep(pid: int) -> bool:
    """A process of PID 1's own keep-alive loop, or one already gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x000.1\x00"
    except OSError:
        return True


# --- 11. processes exec'd into the pod ---------------------------------------------------------


def test_exec_into_the_container_goes_to_float(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare(
        "a busy process joins the container cgroup (kubectl exec, exec probe)",
        "moved to float within the verify interval, off the vCPUs' CPUs; logged and counted",
    )
    rp = start_runner(node, tmp_path, "1-2")
    ready = rp.wait_ready()
    procs = container_of(rp.pod.uid) / "cgroup.procs"
    # As `kubectl exec` does: into the pod's pid namespace, then into the container cgroup.
    enter = subprocess.Popen(
        [
            "nsenter",
            "--target",
            str(rp.runner_pid()),
            "--pid",
            "--",
            "sh",
            "-c",
            'echo $$ > "$0" && exec sh -c "while :; do :; done"',
            str(procs),
        ]
    )
    busy = _Pid(wait_for(lambda: next(iter(_children(enter.pid)), None), what="the exec"))
    try:
        wait_for(
            lambda: str(busy.pid) in procs.read_text().split() or _in_float(busy.pid),
            what="the exec'd process in the container cgroup",
        )
        wait_for(lambda: _in_float(busy.pid), timeout=5, what="the process moved to float")
        allowed = os.sched_getaffinity(busy.pid)
        assert not allowed & cpu_list("1-2"), allowed
        fault.saw(f"moved to float, CPUs {sorted(allowed)}")
        assert vcpus_pinned(host_vcpus(rp, ready))
    finally:
        enter.kill()
        os.kill(busy.pid, signal.SIGKILL)
        enter.wait()
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 0, err
    (moved,) = events(err, "exec-moved-to-float")
    assert moved["comm"] == "sh", moved
    (end,) = events(err, "exit")
    assert end["moved_to_float"] == 1
    fault.saw(f"stop: exit {code}, moved_to_float {end['moved_to_float']}")


class _Pid:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def _in_float(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text().strip().startswith("0::/instances/float")
    except OSError:
        return False


# --- 6. float that grows, on every path --------------------------------------------------------


def float_grew_to_0_3(fault: Fault) -> None:
    wait_for(lambda: float_cpus() == {0, 3}, timeout=15, what="float 0,3")
    wait_for(
        lambda: all(a == {0, 3} for a in float_threads_allowed()),
        timeout=5,
        what="every float thread on 0,3",
    )
    fault.saw(f"float 0,3; {len(float_threads_allowed())} threads allowed on 0,3")


def test_float_growth_reaches_running_threads_embedded(
    node: Node, tmp_path: Path, fault: Fault
) -> None:
    fault.declare(
        f"float grows while running (embedded, kernel {os.uname().release})",
        "every thread in float is allowed on the new CPUs",
    )
    other = node.start("--cpus", "3", cmd=SLEEPER)
    rp = start_runner(node, tmp_path, "1-2")
    rp.wait_ready(timeout=120)
    assert float_cpus() == {0}
    other.terminate()
    float_grew_to_0_3(fault)
    stop(rp, fault)


def test_float_growth_reaches_running_threads_at_controller_start(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        f"float grew while the controller was down (kernel {os.uname().release})",
        "the controller's start spreads every thread in float over the new CPUs",
    )
    other = node.start("--cpus", "3", cmd=SLEEPER)
    pod = start(node, tmp_path, daemon, "1-2", "g")
    pod.wait_ready(timeout=120)
    assert float_cpus() == {0}
    assert daemon.stop() == 0
    other.terminate()
    daemon.start()
    float_grew_to_0_3(fault)
    assert pod.pod.terminate() == 0
