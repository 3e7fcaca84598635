"""The node controller with real runners under podsim: registration, float following
kubelet, restarts, stale cgroups, and hostile input on its socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import kube

from .conftest import CG, Fault, Node, wait_for
from .pods import (
    INSTANCES,
    PROBE,
    RUNNER,
    UNPRIVILEGED,
    UNPRIVILEGED_POD,
    Daemon,
    assert_nothing_left,
    assert_placed,
    capabilities,
    cgroupfs_read_only,
    comm,
    container_of,
    cpu_list,
    error_lines,
    events,
    float_cpus,
    float_of,
    host_vcpus,
    pod_process,
    start,
    start_runner,
    task_cgroup,
    vcpus_pinned,
    write_spec,
)
from .rpc_probe import exchange

FLOAT = INSTANCES / "float"


@pytest.mark.fault
def test_two_pods_register_concurrently_and_float_follows_kubelet(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "kubelet releases a pod's CPUs while another instance runs (controller)",
        "float = defaultCpuSet; the CPU returns to float within 1 s; others untouched",
    )
    a = start(node, tmp_path, daemon, "1", "a")
    b = start(node, tmp_path, daemon, "2-3", "b")
    ready_a, ready_b = a.wait_ready(), b.wait_ready()
    assert cpu_list(node.state()["defaultCpuSet"]) == float_cpus() == {0}
    for pod, ready, cpus in ((a, ready_a, {1}), (b, ready_b, {2, 3})):
        instance = INSTANCES / f"instance-{pod.pod.uid}"
        tids = [int(t) for t in (instance / "cgroup.threads").read_text().split()]
        assert len(tids) == len(cpus)
        assert set().union(*(os.sched_getaffinity(t) for t in tids)) == cpus
        # As the runner sees it, in its own cgroup namespace, and as the node names it.
        seen, root = ready["instance_cgroup"], ready["cgroup_namespace_root"]
        assert root == f"/{container_of(pod.pod.uid).relative_to(CG)}"
        assert kube.on_node(seen, root) == f"/instances/instance-{pod.pod.uid}" != seen

    # podsim rewrites cpu_manager_state when pod a ends; float must follow within a second.
    state_file = node.kubelet / "cpu_manager_state"
    before = state_file.stat().st_mtime_ns
    a.pod.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: state_file.stat().st_mtime_ns != before, what="podsim to release CPU 1")
    released = time.monotonic()
    wait_for(lambda: 1 in float_cpus(), timeout=5, what="float to get CPU 1 back")
    fault.saw(f"CPU 1 back in float {time.monotonic() - released:.2f} s after the state write")
    assert time.monotonic() - released < 1.0
    assert a.finish()[0] == 0
    assert float_cpus() == {0, 1}
    assert b.pod.terminate() == 0
    assert_nothing_left(a.pod.uid)
    assert_nothing_left(b.pod.uid)
    log = daemon.log.read_text()
    assert '"event": "float-cpus"' in log and '"event": "instance-deregistered"' in log


@pytest.mark.fault
def test_restart_leaves_running_instances_alone(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "controller SIGKILLed and restarted mid-run",
        "running instance untouched; state rebuilt; deregistration works",
    )
    pod = start(node, tmp_path, daemon, "1-2", "r")
    pod.wait_ready()
    instance = INSTANCES / f"instance-{pod.pod.uid}"
    before = {
        int(t): os.sched_getaffinity(int(t))
        for t in (instance / "cgroup.threads").read_text().split()
    }
    float_before = float_cpus()
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert daemon.socket.exists()  # a killed controller cannot clean up: the next one must
    daemon.start()
    health = daemon.call("health")["result"]
    assert health == {"status": "ok", "float_cpus": "0,3", "instances": 1}
    listed = daemon.call("listInstances")["result"]["instances"]
    assert [(i["uuid"], i["threads"]) for i in listed] == [(pod.pod.uid, 2)]
    after = {
        int(t): os.sched_getaffinity(int(t))
        for t in (instance / "cgroup.threads").read_text().split()
    }
    assert after == before and float_cpus() == float_before
    fault.saw("threads and affinities unchanged", f"health {health}")
    assert pod.pod.terminate() == 0  # deregistration through the new controller
    assert_nothing_left(pod.pod.uid)
    assert '"event": "instance-deregistered"' in daemon.log.read_text()


@pytest.mark.fault
def test_stale_instance_of_a_killed_runner_is_removed(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "runner SIGKILLed, then its pod removed",
        "stale instance cgroup removed, its CPU back in float",
    )
    pod = start(node, tmp_path, daemon, "2", "k")
    pod.wait_ready()
    instance = INSTANCES / f"instance-{pod.pod.uid}"
    os.kill(pod.runner_pid(), signal.SIGKILL)  # the pod dies; nothing deregisters
    code, _ = pod.finish()
    assert code == 137
    assert pod.pod.uid not in node.state().get("entries", {})
    wait_for(lambda: not instance.exists(), timeout=5, what="the stale instance's removal")
    fault.saw(f"exit {code}", "stale cgroup removed")
    assert "stale: pod gone" in daemon.log.read_text()
    assert 2 in float_cpus()


@pytest.mark.fault
def test_hostile_input_is_answered_and_others_are_served(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "hostile JSON-RPC: other pods' uid/cpuset, bad JSON, 1 MiB line, silent and 200 clients",
        "each answered with its error code; nothing created; the controller serves on",
    )
    other = node.start("--cpus", "3").wait_ready()
    # From inside a pod: another pod's uid, cpuset, CPUs outside the node.
    prober = node.start(
        "--cpus", "1", cmd=[sys.executable, PROBE, "probe", str(daemon.socket), other.uid, "3"]
    )
    out, err = prober.proc.communicate(timeout=60)
    assert prober.proc.returncode == 0, err
    answers = {r["case"]: r["answer"] for r in map(json.loads, out.splitlines())}
    assert answers["own registration"]["result"]["cgroup_path"].startswith("/instances/instance-")
    assert answers["idempotent again"]["result"] == answers["own registration"]["result"]
    for case in ("another pod's uid", "another pod's cpuset", "deregister another pod"):
        assert answers[case]["error"]["code"] == -32001, (case, answers[case])
    # Beyond the node's possible CPUs: refused as it is parsed, before it is expanded.
    assert answers["outside the node"]["error"]["code"] == -32602
    assert "possible CPUs" in answers["outside the node"]["error"]["message"]
    assert answers["own deregistration"]["result"] == {"removed": True}

    # From outside any pod: malformed and hostile messages.
    def raw(payload: bytes) -> dict | None:
        return exchange(str(daemon.socket), payload)

    cases = {
        b"{nope\n": -32700,
        b'[{"jsonrpc":"2.0","method":"health","id":1}]\n': -32600,
        b'{"jsonrpc":"2.0","method":"registerCgroup","id":1,"params":{"uuid":1,"cpuset":2}}'
        b"\n": -32602,
        b'{"jsonrpc":"2.0","method":"format_disk","id":1}\n': -32601,
        b'{"jsonrpc":"2.0","method":"registerCgroup","id":1,"params":{"uuid":"../../etc",'
        b'"cpuset":"1"}}\n': -32602,
        b'{"jsonrpc":"2.0","method":"registerCgroup","id":1,"params":{"uuid":"'
        + other.uid.encode()
        + b'","cpuset":"3"}}\n': -32001,
    }
    for payload, code in cases.items():
        answer = raw(payload)
        assert answer is not None and answer["error"]["code"] == code, (payload[:60], answer)
    # 1 MiB: answered "too large" and closed; a sender still writing sees the close instead.
    huge = raw(b"x" * (1024 * 1024) + b"\n")
    assert huge is None or huge["error"]["code"] == -32004
    assert '"event": "message-too-large"' in daemon.log.read_text()
    # Nothing was created by any of it: float alone (the prober deregistered itself).
    assert sorted(p.name for p in INSTANCES.iterdir() if p.is_dir()) == ["float"]

    # A silent client is dropped after the idle timeout, and does not block anyone meanwhile.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(daemon.socket))
    start_t = time.monotonic()
    assert daemon.call("health")["result"]["status"] == "ok"
    assert time.monotonic() - start_t < 0.5
    silent.settimeout(5)
    assert silent.recv(1) == b""  # closed by the controller
    silent.close()

    # 200 connections at once, every one answered.
    conns = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(str(daemon.socket))
        conns.append(s)
    for s in conns:
        s.sendall(b'{"jsonrpc":"2.0","method":"health","id":1}\n')
    answered = 0
    for s in conns:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        answered += json.loads(data)["result"]["status"] == "ok"
        s.close()
    assert answered == 200
    fault.saw(
        "-32001 x3, -32602 from a pod, -32700/-32600/-32602/-32601 from outside", "200/200 answered"
    )
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert other.terminate() == 0


@pytest.mark.fault
def test_refuses_a_live_socket_and_a_non_socket(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "a second controller on a live socket, a too-long path",
        "each refused with one line, exit 1; the live socket kept",
    )
    second = subprocess.run(
        [RUNNER, "controller", "--socket", str(daemon.socket), "--kubelet-dir", str(node.kubelet)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "another controller is serving" in second.stderr
    assert daemon.socket.exists()
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o660"
    long_path = "/run/" + "x" * 120 + ".sock"
    fourth = subprocess.run(
        [RUNNER, "controller", "--socket", long_path], capture_output=True, text=True, timeout=30
    )
    assert fourth.returncode == 1
    errors = [line for line in fourth.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and "at most 107 bytes" in errors[0], fourth.stderr
    fault.saw("exit 1 x2, live socket kept")


@pytest.mark.fault
def test_runner_gives_up_on_an_absent_controller(node: Node, tmp_path: Path, fault: Fault) -> None:
    fault.declare("controller absent at start", "retried for --controller-timeout, then exit 1")
    rp = start_runner(
        node,
        tmp_path,
        "1",
        "--controller-socket",
        str(tmp_path / "absent.sock"),
        "--controller-timeout",
        "2",
    )
    _out, err = rp.pod.proc.communicate(timeout=60)
    errors = [json.loads(line) for line in err.splitlines() if '"level": "error"' in line]
    fault.saw(f"exit {rp.pod.proc.returncode}", *(f"error: {e['error']}" for e in errors))
    assert rp.pod.proc.returncode == 1
    assert len(errors) == 1 and "no answer from the controller" in errors[0]["error"]
    assert_nothing_left(rp.pod.uid)


DAMAGED = {
    "corrupt": "\x00\x17garbage{",
    "truncated": '{"policyName":"static","defaultCpuSet":"0,3","entries":{"',
    "missing": None,
}


@pytest.mark.fault
@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_kubelet_state_while_running(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault, kind: str
) -> None:
    fault.declare(
        f"cpu_manager_state {kind} while an instance runs (controller)",
        "logged; float and the instance untouched; the controller serves on",
    )
    pod = start(node, tmp_path, daemon, "1-2", "d")
    pod.wait_ready()
    state_file = node.kubelet / "cpu_manager_state"
    good = state_file.read_text()
    damaged = DAMAGED[kind]
    if damaged is None:
        state_file.unlink()
    else:
        staged = node.kubelet / ".staged"
        staged.write_text(damaged)
        staged.rename(state_file)  # as kubelet writes it: one rename, one inotify event
    time.sleep(2.5)  # an event and a periodic resync (2 s)
    assert float_cpus() == {0, 3}
    instance = INSTANCES / f"instance-{pod.pod.uid}"
    tids = [int(t) for t in (instance / "cgroup.threads").read_text().split()]
    assert sorted(os.sched_getaffinity(t) for t in tids) == [{1}, {2}]
    health = daemon.call("health")["result"]
    assert health["instances"] == 1
    fault.saw(f"float {sorted(float_cpus())}, vCPUs pinned, health ok")
    if damaged is not None:
        assert '"event": "kubelet-state-unreadable"' in daemon.log.read_text()
        fault.saw("kubelet-state-unreadable logged")
    state_file.write_text(good)
    assert pod.pod.terminate() == 0
    assert_nothing_left(pod.pod.uid)


def test_bench_registration_latency(node: Node, tmp_path: Path, daemon: Daemon) -> None:
    """Not a timing assertion: prints the numbers (p50/p99) for the record. One pod may hold
    8 connections at once (server.MAX_PER_CALLER): that is its concurrency."""
    bench = node.start(
        "--cpus", "1", cmd=[sys.executable, PROBE, "bench", str(daemon.socket), "96", "8"]
    )
    out, err = bench.proc.communicate(timeout=300)
    assert bench.proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    print(f"\nregistration latency: {result}")
    assert result["sequential_fresh"]["n"] == 96 and result["concurrent_8"]["n"] == 96


def kernel_thread(names: tuple[str, ...]) -> int:
    """A kernel thread the kernel lets cgroups move (not bound to a CPU), by name."""
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            return int(p)
    raise AssertionError(f"none of the kernel threads {names} runs here")


def test_kernel_threads_in_the_container_cgroup_go_to_float(
    node: Node, tmp_path: Path, daemon: Daemon
) -> None:
    """KVM's kvm-nx-lpage-recovery (kernels up to 6.12) is attached to the container cgroup
    of the QEMU that made the VM. The test VM has no KVM, so another movable kernel thread is
    written there, as the kernel would: the controller moves it to float."""
    pod = start(node, tmp_path, daemon, "1-2", "k")
    pod.wait_ready()
    container = container_of(pod.pod.uid)
    kthread = kernel_thread(("khugepaged", "kswapd0", "kcompactd0"))
    home = Path(f"/proc/{kthread}/cgroup").read_text().strip().removeprefix("0::")
    (container / "cgroup.procs").write_text(str(kthread))
    try:
        assert os.sched_getaffinity(kthread) & {1, 2}  # on the dedicated CPUs now
        wait_for(
            lambda: (
                Path(f"/proc/{kthread}/cgroup").read_text().strip() == f"0::{float_of(pod.pod.uid)}"
            ),
            timeout=30,
            what="the controller to move the kernel thread to float",
        )
        assert not os.sched_getaffinity(kthread) & {1, 2}

        def moved() -> list[int]:  # the line is written just after the move: wait for it
            log = daemon.log.read_text().splitlines()
            return [json.loads(x)["pid"] for x in log if '"kernel-thread-moved"' in x]

        wait_for(moved, timeout=10, what="the kernel-thread-moved line")
        assert moved() == [kthread], daemon.log.read_text()
    finally:  # back where it was: float must be empty once the pod is gone
        (CG / home.lstrip("/") / "cgroup.procs").write_text(str(kthread))
    assert pod.pod.terminate() == 0
    assert_nothing_left(pod.pod.uid)


CAP_SYS_ADMIN, CAP_SYS_NICE = 21, 23


def test_an_unprivileged_pod_is_placed_and_kept_by_the_controller(
    node: Node, tmp_path: Path, daemon: Daemon
) -> None:
    """The VM pod has a read-only cgroupfs and no SYS_ADMIN or SYS_NICE: every write that
    needs the host is the controller's, and so is keeping the vCPUs placed."""
    pod = start(node, tmp_path, daemon, "1-2", "u")
    ready = pod.wait_ready()
    runner = pod.runner_pid()
    assert cgroupfs_read_only(runner)
    assert not capabilities(runner) & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_NICE)
    # A cgroup namespace of its own, rooted at its container cgroup.
    assert (
        Path(f"/proc/{runner}/ns/cgroup").stat().st_ino
        != Path("/proc/self/ns/cgroup").stat().st_ino
    )
    anchor = assert_placed(runner, pod.pod.uid, {1, 2}, {0, 1, 2, 3})
    log = [json.loads(x) for x in daemon.log.read_text().splitlines() if x.startswith("{")]
    moved = [(e["pid"], e["to"]) for e in log if e["event"] == "tenant-process-moved"]
    assert moved[0] == (1, "float")  # the runner, PID 1 of its pod
    assert moved[1][1] == "container"  # QEMU before it runs: its RAM is charged to the pod
    placed = [e for e in log if e["event"] == "tenant-vcpus-placed"]
    assert len(placed) == 1 and placed[0]["placement"] == {"0": 1, "1": 2}

    # Kept by the controller: a vCPU moved off its CPU comes back; a process that joins the
    # container cgroup (as kubectl exec does) goes to float.
    vcpus = host_vcpus(pod, ready)
    os.sched_setaffinity(vcpus[0]["tid"], {0, 1, 2, 3})
    wait_for(lambda: vcpus_pinned(vcpus), timeout=10, what="the controller to repin the vCPU")
    container = container_of(pod.pod.uid)
    execd = subprocess.Popen(
        [
            "nsenter",
            "--target",
            str(runner),
            "--pid",
            "sh",
            "-c",
            f"echo $$ > {container}/cgroup.procs && exec sleep 300",
        ],
    )
    try:
        # nsenter forks into the pod's PID namespace: its child is the exec'd process.
        children = Path(f"/proc/{execd.pid}/task/{execd.pid}/children")
        (child,) = wait_for(lambda: children.read_text().split(), what="nsenter's child")
        wait_for(
            lambda: task_cgroup(int(child), int(child)) == float_of(pod.pod.uid),
            timeout=10,
            what="the controller to move the exec'd process to float",
        )
        assert not os.sched_getaffinity(int(child)) & {1, 2}
    finally:
        execd.kill()
        execd.wait()
    assert assert_placed(runner, pod.pod.uid, {1, 2}, {0, 1, 2, 3}) == anchor
    assert pod.pod.terminate() == 0
    assert_nothing_left(pod.pod.uid)
    events = daemon.log.read_text()
    assert '"event": "tenant-keeping-ended"' in events
    assert '"event": "vcpu-repinned"' in events and '"event": "exec-moved-to-float"' in events


@pytest.mark.fault
def test_an_unprivileged_pod_cannot_reach_another(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "from inside an unprivileged pod: host cgroup writes, another pod's threads, CPUs, TIDs",
        "every write fails (EROFS, ESRCH); every request is refused (-32001), a read of the "
        "victim's status too; the victim runs on",
    )
    victim = start(node, tmp_path, daemon, "1-2", "v")
    ready = victim.wait_ready()
    runner = victim.runner_pid()
    vcpus = host_vcpus(victim, ready)
    qemu = pod_process(victim, "qemu-system")
    attacker = node.start(
        "--cpus",
        "3",
        *UNPRIVILEGED,
        cmd=[
            sys.executable,
            PROBE,
            "tenant",
            str(daemon.socket),
            victim.pod.uid,
            str(qemu),
            str(vcpus[0]["tid"]),
        ],
    )
    out, err = attacker.proc.communicate(timeout=90)
    assert attacker.proc.returncode == 0, err
    answers = {r["case"]: r["answer"] for r in map(json.loads, out.splitlines())}
    for case in (
        "write the victim's instance cgroup",
        "write float's cpuset",
        "write the victim's vCPU into our container",
    ):
        assert answers[case] == "EROFS", (case, answers[case])
    assert answers["pin the victim's vCPU"] == "ESRCH"
    assert answers["own registration"]["result"]["cgroup_path"].endswith(attacker.uid)
    refused = [
        "register the victim's CPUs",
        "move for the victim",
        "read the victim's status",
        "move the victim's QEMU",
        "move the victim's QEMU back",
        "place the victim's vCPU",
        "place the victim's QEMU",
        "place on the victim's CPU",
    ]
    for case in refused:
        assert answers[case]["error"]["code"] == -32001, (case, answers[case])
    assert answers["own deregistration"]["result"] == {"removed": True}
    fault.saw(
        "EROFS x3, ESRCH, -32001 x8: "
        + "; ".join(answers[c]["error"]["message"][:50] for c in refused[1:3])
    )
    refusals = [
        json.loads(x)["method"]
        for x in daemon.log.read_text().splitlines()
        if '"event": "request-refused"' in x
    ]
    assert refusals.count("moveProcess") == 3 and refusals.count("placeVcpus") == 3
    assert refusals.count("instanceStatus") == 1
    assert "registerCgroup" in refusals
    # The victim saw none of it.
    assert assert_placed(runner, victim.pod.uid, {1, 2}, {0, 1, 2, 3})
    assert vcpus_pinned(vcpus)
    assert victim.pod.terminate() == 0
    assert_nothing_left(victim.pod.uid)
    assert_nothing_left(attacker.uid)


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only-volume"])
def test_an_unprivileged_pod_serves_a_share_from_a_chroot_sandbox(
    node: Node, tmp_path: Path, daemon: Daemon, read_only: bool
) -> None:
    """virtiofsd cannot make namespaces without CAP_SYS_ADMIN: it sandboxes in a chroot. A
    read-only share is served when the pod has its source on a read-only mount (a volume
    mounted with readOnly: true), with no bind mount of the runner's."""
    share = tmp_path / "share"
    share.mkdir()
    spec = write_spec(
        tmp_path, vcpus=2, shares=[{"source": str(share), "tag": "data", "read_only": read_only}]
    )
    volume = ("--read-only-path", str(share)) if read_only else ()
    rp = start_runner(
        node,
        tmp_path,
        "1-2",
        "--controller-socket",
        str(daemon.socket),
        spec=spec,
        podsim=(*UNPRIVILEGED_POD, *volume),
        run_dir=Path(f"/run/rw-{os.getpid()}"),
    )
    rp.wait_ready()
    runner = rp.runner_pid()
    virtiofsd = pod_process(rp, "virtiofsd")
    assert "sandbox=chroot" in Path(f"/proc/{virtiofsd}/cmdline").read_bytes().decode()
    assert task_cgroup(virtiofsd, virtiofsd) == float_of(rp.pod.uid)
    assert comm(int(Path(f"/proc/{virtiofsd}/stat").read_text().rsplit(")", 1)[1].split()[1])) == (
        "instance-runner"
    )  # its parent: no unshare and mount wrapper of ours
    # The source as virtiofsd sees it: its root, chrooted there in the pod's mount namespace.
    writable = os.statvfs(f"/proc/{virtiofsd}/root").f_flag & os.ST_RDONLY == 0
    assert writable is not read_only
    assert_placed(runner, rp.pod.uid, {1, 2}, {0, 1, 2, 3})
    assert rp.pod.terminate() == 0
    assert_nothing_left(rp.pod.uid)


@pytest.mark.fault
def test_an_unprivileged_pod_with_a_read_only_share_is_refused_in_one_line(
    node: Node, tmp_path: Path, daemon: Daemon, fault: Fault
) -> None:
    fault.declare(
        "a read-only share on a writable mount asked of a VM pod that is not privileged "
        "(making it read-only takes a bind mount, which needs SYS_ADMIN)",
        "exit 1 with one line naming CAP_SYS_ADMIN and readOnly, before anything runs; "
        "nothing left",
    )
    share = tmp_path / "share"
    share.mkdir()
    spec = write_spec(
        tmp_path, vcpus=2, shares=[{"source": str(share), "tag": "data", "read_only": True}]
    )
    rp = start_runner(
        node,
        tmp_path,
        "1-2",
        "--controller-socket",
        str(daemon.socket),
        spec=spec,
        podsim=UNPRIVILEGED_POD,
    )
    code, err = rp.finish()
    (error,) = error_lines(err)
    fault.saw(f"exit {code}: {error['error'][:90]}")
    assert code == 1, err
    assert error["event"] == "startup-failed" and "CAP_SYS_ADMIN" in error["error"]
    assert "readOnly: true" in error["error"]
    assert not events(err, "qemu-started")
    assert_nothing_left(rp.pod.uid)
    assert sorted(p.name for p in INSTANCES.iterdir() if p.is_dir()) == ["float"]
