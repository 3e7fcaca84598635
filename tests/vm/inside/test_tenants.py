"""The tenant boundary, tried as a hostile tenant would: root exec'd into its own VM pod, which
is not privileged (the runtime's default capabilities, its own PID and cgroup namespaces, the
controller's socket directory mounted read-only), as kubectl exec puts a process there.

One controller, one victim VM pod, one attacker VM pod and one watcher pod serve every attack
of the module. After each: the controller is still up, the watcher (a second pod) had every
health call answered within 1 s throughout, and the victim's vCPUs are still alone on their
CPUs, every other thread of it in its part of float."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import CG, Fault, Node, Pod, wait_for
from .pods import (
    FLOAT,
    INSTANCES,
    PROBE,
    UNPRIVILEGED,
    UNPRIVILEGED_POD,
    Daemon,
    RunnerPod,
    assert_nothing_left,
    container_of,
    cpu_list,
    float_of,
    host_vcpus,
    pod_process,
    start_runner,
    task_cgroup,
    vcpus_pinned,
    write_spec,
)
from .rpc_probe import DEFAULT_CAPS

pytestmark = pytest.mark.fault

PIDS_MAX = 64  # one pod's tasks in float (--pod-float-pids-max)
CPUS_CAP = 0.5  # one pod's CPU time in float (--pod-float-cpus)
HEALTH_BOUND = 1.0  # seconds: a second pod's health call, throughout
PYTHON = sys.executable


class Boundary:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.node = Node(tmp)
        self.sockets = Path(f"/run/irt-{os.getpid()}")  # short: it holds a Unix socket
        self.sockets.mkdir(mode=0o755)
        self.daemon = Daemon(self.node, tmp)
        self.daemon.socket = self.sockets / "controller.sock"
        self.daemon.extra = (
            *("--pod-float-pids-max", str(PIDS_MAX), "--pod-float-cpus", str(CPUS_CAP)),
            *("--verify-interval", "0.5", "--idle-timeout", "10"),
        )
        self.daemon.start()
        self.victim = self.vm_pod("1", "victim")
        self.attacker = self.vm_pod("2-3", "attacker")
        self.victim_ready = self.victim.wait_ready()
        self.attacker.wait_ready()
        self.victim_vcpus = host_vcpus(self.victim, self.victim_ready)
        self.watch_file = tmp / "watch.log"
        self.watcher = self.node.start(
            "--qos",
            "burstable",
            *UNPRIVILEGED,
            "--read-only-path",
            str(self.sockets),
            cmd=[PYTHON, PROBE, "watch", str(self.daemon.socket), str(self.watch_file)],
        )
        wait_for(lambda: self.samples(0, time.monotonic()), what="the watcher's first call")

    def vm_pod(self, cpus: str, name: str) -> RunnerPod:
        work = self.tmp / name
        work.mkdir()
        return start_runner(
            self.node,
            work,
            cpus,
            "--shutdown-timeout",
            "0",
            "--controller-socket",
            str(self.daemon.socket),
            "--controller-timeout",
            "30",
            spec=write_spec(work, vcpus=len(cpu_list(cpus)), name=name),
            podsim=(*UNPRIVILEGED_POD, "--read-only-path", str(self.sockets)),
        )

    def exec(self, attack: str, *args: str, join: bool = True) -> subprocess.Popen[str]:
        """An attack exec'd into the attacker's pod: it joins the container cgroup (from the
        node, as the runtime does; `join` False: the test writes it there later), then enters
        the pod's mount and cgroup namespaces and keeps the runtime's default capabilities
        alone."""
        runner = self.attacker.runner_pid()
        procs = container_of(self.attacker.pod.uid) / "cgroup.procs" if join else "/dev/null"
        inner = [
            # --root: the pod's root is the test VM's chroot, not its mount namespace's root.
            *("nsenter", "--target", str(runner), "--mount", "--cgroup", "--root", "--wd", "--"),
            *("env", f"INSTANCE_RUNNER_POD_UID={self.attacker.pod.uid}"),
            # The probe keeps the runtime's default capabilities alone before it attacks.
            *(PYTHON, PROBE, "attack", attack, str(self.daemon.socket), *args),
        ]
        return subprocess.Popen(
            [
                *("nsenter", "--target", str(runner), "--pid", "--"),
                *("sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *inner),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    @staticmethod
    def read(proc: subprocess.Popen[str]) -> dict:
        """The attack's next outcome line, or what it said on stderr if it ended."""
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise AssertionError(f"the attack ended ({proc.returncode}): {proc.stderr.read()}")
        return dict(json.loads(line))

    def run(self, attack: str, *args: str, timeout: float = 120) -> dict[str, object]:
        proc = self.exec(attack, *args)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        return {r["case"]: r["answer"] for r in map(json.loads, out.splitlines())}

    def pod_run(self, attack: str, *args: str, uid: str | None = None) -> Pod:
        """An attack as PID 1 of a pod of its own on CPU 4 (unprivileged, private namespaces):
        a process that stays in its container cgroup, as a runner registering does."""
        uid = uid or str(uuid.uuid4())
        return self.node.start(
            "--cpus",
            "4",
            *UNPRIVILEGED_POD,
            "--read-only-path",
            str(self.sockets),
            uid=uid,
            cmd=[
                *("env", f"INSTANCE_RUNNER_POD_UID={uid}"),
                *(PYTHON, PROBE, "attack", attack, str(self.daemon.socket), *args),
            ],
        )

    @staticmethod
    def outcomes(pod: Pod, timeout: float = 120) -> dict[str, object]:
        out, err = pod.proc.communicate(timeout=timeout)
        assert pod.proc.returncode == 0, err
        return {r["case"]: r["answer"] for r in map(json.loads, out.splitlines())}

    def samples(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        if not self.watch_file.exists():
            return []
        found = []
        for line in self.watch_file.read_text().splitlines():
            t, latency, ok = line.split()
            if start <= float(t) <= end:
                found.append((float(t), float(latency), ok == "1"))
        return found

    def check(self, fault: Fault, since: float) -> None:
        """The three things every attack must leave as they were."""
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, "controller died"
        time.sleep(0.5)  # the watcher's call in flight at the end
        seen = self.samples(since, time.monotonic())
        assert len(seen) >= 2, "the watcher made no health call meanwhile"
        slowest = max(latency for _, latency, _ in seen)
        assert all(ok for _, _, ok in seen), [s for s in seen if not s[2]][:3]
        assert slowest < HEALTH_BOUND, slowest
        assert self.victim_placed()
        fault.saw(f"controller up; {len(seen)} health calls, slowest {slowest * 1000:.0f} ms")

    def victim_placed(self) -> bool:
        """Its vCPUs alone in its instance cgroup on their CPUs, its container cgroup the
        anchor's alone, everything else of it in its part of float."""
        uid = self.victim.pod.uid
        instance = INSTANCES / f"instance-{uid}"
        tids = {int(t) for t in (instance / "cgroup.threads").read_text().split()}
        anchor = (container_of(uid) / "cgroup.procs").read_text().split()
        qemu = pod_process(self.victim, "qemu-system")
        return (
            vcpus_pinned(self.victim_vcpus)
            and tids == {v["tid"] for v in self.victim_vcpus}
            and len(anchor) == 1
            and task_cgroup(qemu, qemu) == float_of(uid)
        )

    def log(self) -> list[dict]:
        return [
            json.loads(x) for x in self.daemon.log.read_text().splitlines() if x.startswith("{")
        ]

    def close(self) -> None:
        self.watcher.terminate()
        for rp in (self.victim, self.attacker):
            rp.pod.proc.send_signal(signal.SIGTERM)
        codes = [rp.finish()[0] for rp in (self.victim, self.attacker)]
        # The attacker's own pod may have suffered its own attacks; the victim may not.
        assert codes[0] == 0, codes
        for rp in (self.victim, self.attacker):
            assert_nothing_left(rp.pod.uid)
        assert self.daemon.stop() == 0
        assert not self.daemon.socket.exists()
        for p in self.sockets.iterdir():
            p.unlink()
        self.sockets.rmdir()


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boundary]:
    boundary = Boundary(tmp_path_factory.mktemp("boundary"))
    try:
        yield boundary
    finally:
        boundary.close()


def test_a_process_name_that_is_not_utf8(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "a process named \\xff\\xfe\\xfd exec'd into a kept pod, connecting so",
        "swept to the pod's float, its name logged escaped; nothing else changes",
    )
    since = time.monotonic()
    proc = b.exec("comm", "300", join=False)
    try:
        lines = [b.read(proc) for _ in range(4)]
        # Named so, it is written into the kept pod's container cgroup, as the runtime does.
        (pid,) = (
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        )
        (container_of(b.attacker.pod.uid) / "cgroup.procs").write_text(str(pid))
        assert lines[0]["answer"] == "fffefd"
        # As the runtime execs it: its default capabilities alone.
        assert int(lines[1]["answer"], 16) == sum(1 << c for c in DEFAULT_CAPS)
        assert lines[2]["answer"]["answer"]["result"]["status"] == "ok"
        attacker = float_of(b.attacker.pod.uid)
        wait_for(lambda: task_cgroup(pid, pid) == attacker, timeout=10, what="the sweep")
        # The OOM killer's first choice from now on, before any tenant's QEMU (written just
        # after the move).
        wait_for(
            lambda: Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "1000",
            timeout=5,
            what="oom_score_adj 1000",
        )
        # Logged just after the move, its name escaped.
        wait_for(
            lambda: any(
                e["event"] == "exec-moved-to-float" and e["comm"] == "\udcff\udcfe\udcfd"
                for e in b.log()
            ),
            timeout=10,
            what="the sweep's log line",
        )
        fault.saw(f"swept to {attacker.rsplit('/', 1)[1][:12]}…")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    b.check(fault, since)


def test_a_cpu_list_beyond_the_node(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "registerCgroup with cpuset 0-50000000, 0-4294967295:1/4294967295, overlapping ranges",
        "-32602 at once for each, naming the node's possible CPUs; nothing expanded",
    )
    since = time.monotonic()
    answers = b.outcomes(b.pod_run("cpu-range"))
    assert {a["code"] for a in answers.values()} == {-32602}, answers  # type: ignore[index]
    slowest = max(a["seconds"] for a in answers.values())  # type: ignore[index]
    assert slowest < HEALTH_BOUND
    fault.saw(f"-32602 x{len(answers)}, slowest {slowest * 1000:.0f} ms")
    b.check(fault, since)


def test_requests_that_are_expensive_to_decode(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "30 lines of 64 KiB of empty vCPU objects at once (placeVcpus)",
        "each refused (-32600, a list over 1024 items) in a reply under 512 bytes",
    )
    since = time.monotonic()
    answers = b.run("decoder", "30")
    assert answers["codes"] == [-32600] and answers["answered"] == 30, answers
    assert answers["largest reply"] < 512  # type: ignore[operator]
    fault.saw(f"30 answered -32600, slowest {answers['slowest']} s")
    b.check(fault, since)


def test_a_peer_gone_before_it_is_seen(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "a request whose sender exited and was reaped before the controller accepted it "
        "(the controller's loop stalled meanwhile)",
        "refused: the peer cannot be proven, no fallback to its PID",
    )
    assert b.daemon.proc is not None
    b.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        answers = b.run("peer-gone", b.victim.pod.uid)
    finally:
        b.daemon.proc.send_signal(signal.SIGCONT)
    since = time.monotonic()
    assert answers["asked and reaped"]

    def refused() -> list[dict]:
        return [
            e
            for e in b.log()
            if e["event"] == "request-refused" and e["method"] == "deregisterCgroup"
        ]

    (seen,) = wait_for(refused, timeout=10, what="the refusal")
    assert seen["peer"].startswith("peer gone"), seen
    assert (INSTANCES / f"instance-{b.victim.pod.uid}").exists()
    fault.saw(f"refused: {seen['peer']}")
    time.sleep(1)
    b.check(fault, since)


def test_the_socket_is_the_controllers_alone(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "from a pod: unlink the controller's socket, bind one beside it; from the node: remove "
        "it, then leave a file at its path across a restart",
        "EROFS in the pod; rebound within 1 s; the file moved aside, the controller serving",
    )
    since = time.monotonic()
    answers = b.run("socket-dir")
    assert answers["unlink"] == answers["bind beside it"] == "EROFS", answers
    assert answers["health"] == "ok"
    b.check(fault, since)

    before = b.daemon.socket.stat().st_ino
    b.daemon.socket.unlink()
    removed = time.monotonic()
    wait_for(
        lambda: b.daemon.socket.exists() and b.daemon.socket.stat().st_ino != before,
        timeout=5,
        what="the socket bound again",
    )
    fault.saw(f"rebound in {time.monotonic() - removed:.1f} s")
    # Logged once it is bound: a moment after the socket appears.
    wait_for(
        lambda: any(e["event"] == "socket-rebound" for e in b.log()),
        timeout=5,
        what="socket-rebound logged",
    )

    assert b.daemon.stop() == 0
    b.daemon.socket.write_text("left by someone")
    b.daemon.start()
    aside = list(b.sockets.glob("controller.sock.stale-*"))
    assert len(aside) == 1 and aside[0].read_text() == "left by someone"
    aside[0].unlink()
    assert any(e["event"] == "socket-path-moved-aside" for e in b.log())
    fault.saw("a file at the path moved aside at start")
    b.check(fault, time.monotonic())


def test_realtime_above_the_nodes_cap(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "placeVcpus with SCHED_FIFO 99 (cap 1), and one thread for two vCPUs",
        "-32001 for 99 (1 reaches the already-placed check, -32002); -32602 for the thread",
    )
    since = time.monotonic()
    answers = b.run("realtime")
    assert answers == {"fifo 99": -32001, "fifo 1": -32002, "one thread twice": -32602}, answers
    fault.saw("-32001, -32002, -32602")
    b.check(fault, since)


def test_connections_beyond_a_pods_share(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "a pod holds 8 connections with a request a second, opens one more, and a silent one",
        "the 9th refused at once, the silent one closed after 2 s; other pods served",
    )
    since = time.monotonic()
    answers = b.run("connections", "8")
    assert answers["one more"] == "refused" and answers["held answered"] == 24, answers
    assert 1.5 <= answers["silent closed after"] <= 4, answers  # type: ignore[operator]
    fault.saw(f"9th refused; silent closed after {answers['silent closed after']} s")
    b.check(fault, since)


def test_notifications(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "notifications (no id) with a 5000- and a 60000-character method name",
        "the first's connection closed unanswered, its name cut in the log; the second -32600",
    )
    since = time.monotonic()
    answers = b.run("notification")
    assert answers == {"method of 5000": "closed", "method of 60000": -32600}, answers
    lines = b.daemon.log.read_text().splitlines()
    assert max(len(x) for x in lines) < 2000
    fault.saw(f"longest log line {max(len(x) for x in lines)} chars")
    b.check(fault, since)


def test_who_may_know_what(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "a pod asks for listInstances, health and its own instanceStatus",
        "listInstances -32001; health says only ok; status names its own cgroups alone",
    )
    since = time.monotonic()
    answers = b.run("who-knows")
    assert answers["listInstances"] == -32001, answers
    assert answers["health"] == {"status": "ok", "float_cpus": None, "instances": None}
    assert set(answers["own status"]) <= {"instance", "float"}  # type: ignore[arg-type]
    # The node itself sees the whole node.
    assert len(b.daemon.call("listInstances")["result"]["instances"]) >= 2
    fault.saw("-32001; {status: ok}; own pressure only")
    b.check(fault, since)


def test_unknown_kubelet_state_grants_nothing(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "cpu_manager_state missing while a pod registers its CPUs",
        "-32003 (come back later), nothing granted; float kept as it is",
    )
    since = time.monotonic()
    state = b.node.kubelet / "cpu_manager_state"
    gate = b.tmp / "register-gate"
    probe = b.pod_run("register", str(gate))
    assert probe.proc.stdout is not None
    assert json.loads(probe.proc.stdout.readline())["case"] == "waiting"
    good = state.read_text()  # with the probe's own entry: podsim wrote it at its start
    float_before = (FLOAT / "cpuset.cpus").read_text()
    state.unlink()
    try:
        gate.touch()
        answers = {}
        for _ in range(2):
            r = json.loads(probe.proc.stdout.readline())
            answers[r["case"]] = r["answer"]
        time.sleep(1)  # a reconcile's chance to get it wrong
        float_while_unknown = (FLOAT / "cpuset.cpus").read_text()
    finally:
        state.write_text(good)
        Path(f"{gate}.done").touch()
    assert probe.proc.wait(timeout=60) == 0
    assert answers["code"] == -32003 and "unknown" in answers["message"], answers  # type: ignore[operator]
    assert float_while_unknown == float_before
    fault.saw(f"-32003: {str(answers['message'])[:60]}")
    b.check(fault, since)


def test_a_restart_between_registration_and_placement(b: Boundary, fault: Fault) -> None:
    fault.declare(
        "the controller SIGKILLed and restarted after a pod registered, before it placed",
        "the pod adopted: its next request is served",
    )
    since = time.monotonic()
    gate = b.tmp / "gate"
    uid = "5ca1ab1e-0000-4000-8000-000000000001"
    probe = b.pod_run("register-then-move", str(gate), uid=uid)
    assert probe.proc.stdout is not None
    first = json.loads(probe.proc.stdout.readline())
    assert first == {"case": "register", "answer": None}, first
    assert b.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    b.daemon.start()
    since = time.monotonic()  # the restart is the node's doing: calls meanwhile were refused
    gate.touch()
    out, err = probe.proc.communicate(timeout=60)
    answers = {r["case"]: r["answer"] for r in map(json.loads, out.splitlines())}
    assert answers["to float"].get("result") == {"moved": True}, (answers, err)
    assert answers["back"].get("result") == {"moved": True}, answers
    assert answers["deregister"].get("result") == {"removed": True}, answers
    assert any(e["event"] == "tenant-adopted" and e["uuid"] == uid for e in b.log())
    fault.saw("adopted; moved to float and back, deregistered")
    b.check(fault, since)


def run_delay_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1])


def test_a_spinning_tenant_in_float(b: Boundary, fault: Fault) -> None:
    fault.declare(
        f"8 spinning processes exec'd into a pod, swept to float (its cap {CPUS_CAP} CPU)",
        "the pod's part of float uses at most its cap; the victim's QEMU main loop waits "
        "at most 50 ms/s more than on a quiet node",
    )
    since = time.monotonic()
    qemu = pod_process(b.victim, "qemu-system")
    window = 5.0
    quiet_start = run_delay_ns(qemu)
    time.sleep(window)
    quiet = (run_delay_ns(qemu) - quiet_start) / window / 1e6
    proc = b.exec("spinner", "8", str(window + 6))
    assert b.read(proc)["case"] == "swept"
    time.sleep(2)  # every spinner forked, in the pod's part of float
    stat = CG / float_of(b.attacker.pod.uid).lstrip("/") / "cpu.stat"

    def usage() -> int:
        return int(stat.read_text().split()[1])

    noisy_start, used_start = run_delay_ns(qemu), usage()
    time.sleep(window)
    noisy = (run_delay_ns(qemu) - noisy_start) / window / 1e6
    used = (usage() - used_start) / window / 1e6
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    fault.saw(
        f"victim QEMU main loop run delay {quiet:.1f} ms/s quiet, {noisy:.1f} ms/s noisy; "
        f"attacker's float {used:.2f} CPU"
    )
    assert used <= CPUS_CAP * 1.1
    assert noisy - quiet <= 50, (quiet, noisy)
    b.check(fault, since)


def test_a_fork_bomb_stops_at_its_pods_cap(b: Boundary, fault: Fault) -> None:
    fault.declare(
        f"a fork bomb exec'd into a pod, swept to float (its cap {PIDS_MAX} tasks)",
        "fork fails with EAGAIN at the pod's pids.max; other pods untouched",
    )
    since = time.monotonic()
    proc = b.exec("fork-bomb")
    forked = b.read(proc)["answer"]
    why = b.read(proc)["answer"]
    pids = CG / float_of(b.attacker.pod.uid).lstrip("/")
    current = int((pids / "pids.current").read_text())
    events = (pids / "pids.events").read_text()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    fault.saw(f"forked {forked}, then {why}; pids.current {current} of {PIDS_MAX}")
    assert why == "EAGAIN" and current <= PIDS_MAX and forked < PIDS_MAX, (forked, why, current)
    assert "max 0" not in events
    b.check(fault, since)
