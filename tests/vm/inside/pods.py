"""Helpers for the tests inside the test VM: runner pods, the controller daemon, and the
checks they share. Fixtures live in conftest.py; test modules import helpers from here only."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .conftest import CG, REPO, Fault, Node, Pod, kube_cgroups, uid_forms, wait_for
from .rpc_probe import exchange

RUNNER = str(REPO / ".venv" / "bin" / "instance-runner")


INSTANCES = CG / "instances"


FLOAT = INSTANCES / "float"


def write_spec(tmp: Path, **fields: object) -> Path:
    spec = {"name": "vm", "vcpus": 2, "memory_mib": 64, "accel": "tcg", **fields}
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


class RunnerPod:
    def __init__(self, pod: Pod, run_dir: Path) -> None:
        self.pod = pod
        self.run_dir = run_dir

    @property
    def ready_file(self) -> Path:
        return self.run_dir / "ready"

    def wait_ready(self, timeout: float = 180) -> dict:
        wait_for(
            lambda: self.ready_file.exists() or self.pod.proc.poll() is not None,
            timeout=timeout,
            what="the runner to be ready",
        )
        assert self.pod.proc.poll() is None, self.pod.proc.communicate()[1]
        return json.loads(self.ready_file.read_text())

    def runner_pid(self) -> int:
        """Host PID of the pod's PID 1 (podsim's only child)."""
        children = Path(f"/proc/{self.pod.proc.pid}/task/{self.pod.proc.pid}/children")
        (pid,) = children.read_text().split()
        return int(pid)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        _out, err = self.pod.proc.communicate(timeout=timeout)
        return self.pod.proc.returncode, err


def start_runner(
    node: Node,
    tmp: Path,
    cpus: str,
    *args: str,
    driver: str = "systemd",
    spec: Path | None = None,
    prefix: tuple[str, ...] = (),
    run_dir: Path | None = None,
    podsim: tuple[str, ...] = ("--grace", "30"),
    default_run_dir: bool = False,
    uid: str | None = None,
    wrap: tuple[str, ...] = (),
) -> RunnerPod:
    """A runner as PID 1 of a Guaranteed pod on `cpus` (or under `wrap`, a PID 1 of its own);
    later `args` override earlier ones. `default_run_dir`: no --run-dir, the runner picks."""
    run_dir = run_dir or tmp / "run"
    spec = spec or write_spec(tmp, vcpus=len(cpu_list(cpus)))
    where = [] if default_run_dir else ["--run-dir", str(run_dir)]
    if "--cgroupns" in podsim and podsim[podsim.index("--cgroupns") + 1] == "private":
        uid = uid or str(uuid.uuid4())
        where += ["--pod-uid", uid]  # its cgroup, "/" in its namespace, names no pod
    cmd = [
        *wrap,
        *prefix,
        RUNNER,
        "run",
        "--spec",
        str(spec),
        *where,
        "--kubelet-dir",
        str(node.kubelet),
        "--shutdown-timeout",
        "1",
        *args,
    ]
    pod = node.start("--cpus", cpus, "--driver", driver, *podsim, uid=uid, cmd=cmd)
    return RunnerPod(pod, run_dir)


def tasks(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def task_cgroup(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().strip().removeprefix("0::")


def pod_processes(ns_link: str) -> list[int]:
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{p}/ns/pid") == ns_link:
                found.append(int(p))
        except OSError:
            continue
    return found


def cpu_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def container_of(uid: str) -> Path:
    """The pod's container cgroup: the one cgroup below its pod cgroup."""
    pod_dirs = [
        c
        for c in kube_cgroups()
        if c.split("/")[-1]
        in {
            f"pod{uid}",
            *(
                f"{p}pod{uid.replace('-', '_')}.slice"
                for p in ("kubepods-", "kubepods-burstable-", "kubepods-besteffort-")
            ),
        }
    ]
    (pod_dir,) = pod_dirs
    (container,) = [p for p in (CG / pod_dir).iterdir() if p.is_dir()]
    return container


def float_of(uid: str) -> str:
    """The pod's part of float, as the node names it."""
    return f"/instances/float/pod-{uid}"


def assert_nothing_left(uid: str) -> None:
    assert not (INSTANCES / f"instance-{uid}").exists(), "instance cgroup left behind"
    if FLOAT.exists():
        assert (FLOAT / "cgroup.threads").read_text() == "", "threads left in float"
    # Removed at deregistration, or by the float keeper once what the pod swept there ended
    # with its PID namespace.
    own = CG / float_of(uid).lstrip("/")
    wait_for(lambda: not own.exists(), timeout=15, what=f"{own} to be removed")
    assert not [c for c in kube_cgroups() if any(f in c for f in uid_forms(uid))]


def fake_qemu(tmp: Path, body: str) -> Path:
    path = tmp / "fake-qemu"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def error_lines(err: str) -> list[dict]:
    return [
        json.loads(line)
        for line in err.splitlines()
        if line.startswith("{") and '"level": "error"' in line
    ]


def pod_process(rp: RunnerPod, name: str) -> int:
    ns = os.readlink(f"/proc/{rp.runner_pid()}/ns/pid")
    return next(p for p in pod_processes(ns) if comm(p).startswith(name))


def comm(pid: int) -> str:
    """A process's name, or "" once it is gone (processes come and go while we look)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def events(err: str, name: str) -> list[dict]:
    return [
        json.loads(line)
        for line in err.splitlines()
        if line.startswith("{") and f'"event": "{name}"' in line
    ]


def host_vcpus(rp: RunnerPod, ready: dict) -> list[dict]:
    """The readiness file's vCPUs with their thread ids as this (the node's) PID namespace
    sees them: the runner is PID 1 of the pod's and writes those."""
    qemu = pod_process(rp, "qemu-system")
    by_ns_tid = {}
    for t in tasks(qemu):
        status = Path(f"/proc/{qemu}/task/{t}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        by_ns_tid[int(nspid.split()[-1])] = t
    return [{**v, "tid": by_ns_tid[v["tid"]]} for v in ready["vcpus"]]


def running(node: Node, tmp: Path, cpus: str, **kw: Any) -> tuple[RunnerPod, list[dict]]:
    """A ready runner pod, and its vCPUs as this namespace sees them."""
    rp = start_runner(node, tmp, cpus, **kw)
    return rp, host_vcpus(rp, rp.wait_ready())


def vcpus_pinned(vcpus: list[dict]) -> bool:
    """Every vCPU thread still in the instance cgroup and on its own CPU alone."""
    for v in vcpus:
        cgroup = Path(f"/proc/{v['tid']}/cgroup").read_text().strip()
        if not cgroup.startswith("0::/instances/instance-"):
            return False
        if os.sched_getaffinity(v["tid"]) != {v["cpu"]}:
            return False
    return True


def assert_placed(runner: int, uid: str, pod_cpus: set[int], online: set[int]) -> int:
    """The pinning invariants, seen from the node: exactly the vCPU threads of the pod whose
    PID 1 is `runner` are in the instance cgroup, one pod CPU each; the container cgroup holds
    the anchor alone; every other thread of the pod is in float, off the pod's CPUs; float has
    every CPU but the pod's. Returns the anchor's PID."""
    instance = INSTANCES / f"instance-{uid}"
    container = container_of(uid)
    ns = os.readlink(f"/proc/{runner}/ns/pid")
    qemu = next(p for p in pod_processes(ns) if comm(p).startswith("qemu-system"))

    vcpu_tids = {int(t) for t in (instance / "cgroup.threads").read_text().split()}
    assert vcpu_tids == set(tasks(qemu)) & vcpu_tids and len(vcpu_tids) == len(pod_cpus)
    names = {Path(f"/proc/{qemu}/task/{t}/comm").read_text().strip() for t in vcpu_tids}
    assert names == {f"CPU {i}/TCG" for i in range(len(pod_cpus))}
    allowed = [os.sched_getaffinity(t) for t in vcpu_tids]
    assert all(len(a) == 1 for a in allowed)
    assert set().union(*allowed) == pod_cpus
    assert cpu_list((instance / "cpuset.cpus").read_text()) == pod_cpus

    anchor_pids = [int(p) for p in (container / "cgroup.procs").read_text().split()]
    assert len(anchor_pids) == 1, "the container cgroup must hold the anchor alone"
    anchor = anchor_pids[0]
    assert Path(f"/proc/{anchor}/cmdline").read_bytes() == b"sleep\0infinity\0"
    assert task_cgroup(anchor, anchor) == f"/{container.relative_to(CG)}"
    checked = 0
    for p in pod_processes(ns):
        if p == anchor:
            continue
        for t in tasks(p):
            if t in vcpu_tids:
                continue
            assert task_cgroup(p, t) == float_of(uid), (p, t, comm(p))
            assert not os.sched_getaffinity(t) & pod_cpus, (p, t, comm(p))
            checked += 1
    assert checked >= 3  # runner, QEMU main thread, QEMU's other threads
    assert cpu_list((FLOAT / "cpuset.cpus").read_text()) == online - pod_cpus
    return anchor


def stop(rp: RunnerPod, fault: Fault) -> int:
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    fault.saw(f"stop: exit {code}")
    assert code == 0, err
    return code


def short_run_dir(tmp: Path) -> Path:
    """virtiofs sockets live in the run dir, and socket paths are limited to 107 bytes: a
    nested pytest's tmp path can be longer than that."""
    link = Path(tempfile.mkdtemp(prefix="rd-", dir="/run"))
    (tmp / "run").mkdir()
    link.rmdir()
    link.symlink_to(tmp / "run")
    return link


def plumbed_spec(tmp: Path) -> Path:
    share = tmp / "share"
    share.mkdir()
    return write_spec(
        tmp,
        vcpus=2,
        nics=[{"mode": "tap", "binding": "isolated", "ip": "10.0.2.15"}],
        shares=[{"source": str(share), "tag": "data"}],
        name="plumbed",
    )


PROBE = str(Path(__file__).with_name("rpc_probe.py"))


class Daemon:
    def __init__(self, node: Node, tmp: Path) -> None:
        self.node = node
        # Short and fixed-length: AF_UNIX paths are limited to 107 bytes, tmp paths are not.
        self.socket = Path(f"/run/ctl-{os.getpid()}-{id(self):x}.sock")
        self.log = tmp / "controller.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: tuple[str, ...] = ()  # more controller options

    def start(self) -> Daemon:
        self.node.podsim("state")  # kubelet has written its state before the DaemonSet runs
        self.proc = subprocess.Popen(
            [
                RUNNER,
                "controller",
                "--socket",
                str(self.socket),
                "--kubelet-dir",
                str(self.node.kubelet),
                "--idle-timeout",
                "1",
                "--resync-interval",
                "2",
                *self.extra,
            ],
            stderr=open(self.log, "ab"),  # noqa: SIM115 - the daemon owns it
        )
        try:
            wait_for(
                lambda: self.answers() or self.proc.poll() is not None,
                timeout=60,
                what="the controller to answer",
            )
        except AssertionError:
            # Never leave it running: a stray controller would sweep later tests' cgroups.
            self.proc.kill()
            self.proc.wait()
            raise
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def answers(self) -> bool:
        try:
            return bool(self.call("health")["result"]["status"] == "ok")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def call(self, method: str, params: object | None = None) -> dict:
        doc = {
            "jsonrpc": "2.0",
            "method": method,
            "id": 1,
            **({"params": params} if params is not None else {}),
        }
        answer = exchange(str(self.socket), (json.dumps(doc) + "\n").encode())
        assert answer is not None, f"no answer to {method}"
        return answer


# A container that is not privileged: the host's cgroupfs is read-only in it, and it has the
# container runtime's default capabilities only (none of SYS_ADMIN, SYS_NICE).
UNPRIVILEGED = ("--grace", "30", "--unprivileged")
# A VM pod in controller mode, as containerd makes it on cgroup v2: also in a cgroup namespace
# of its own, so it is told its pod UID (the Downward API's metadata.uid).
UNPRIVILEGED_POD = (*UNPRIVILEGED, "--cgroupns", "private")


def capabilities(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)


def cgroupfs_read_only(pid: int) -> bool:
    """Whether the cgroup2 mount that `pid` sees at /sys/fs/cgroup is read-only (mountinfo's
    options field; the last mount on a mount point is the one seen)."""
    seen = None
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if tail.startswith("cgroup2 ") and fields[4] == str(CG):
            seen = "ro" in fields[5].split(",")
    assert seen is not None, f"no cgroup2 mount in {pid}'s mount namespace"
    return seen


def start(node: Node, tmp: Path, daemon: Daemon, cpus: str, name: str) -> RunnerPod:
    work = tmp / name
    work.mkdir()
    spec = write_spec(work, vcpus=len(cpu_list(cpus)), name=name)
    return start_runner(
        node,
        work,
        cpus,
        "--shutdown-timeout",
        "0",
        "--controller-socket",
        str(daemon.socket),
        "--controller-timeout",
        "20",
        spec=spec,
        podsim=UNPRIVILEGED_POD,
    )


def float_cpus() -> set[int]:
    return cpu_list((FLOAT / "cpuset.cpus").read_text())
