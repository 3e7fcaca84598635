"""Fixtures for tests that run inside the test VM as root on a pure cgroup v2 host."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

if TYPE_CHECKING:
    from .pods import Daemon

REPO = Path(__file__).resolve().parents[3]
PODSIM = REPO / "scripts" / "podsim"
CG = Path("/sys/fs/cgroup")
T = TypeVar("T")

if not os.environ.get("TESTVM"):  # pragma: no cover - guarded by tests/conftest.py too
    pytest.skip("runs inside scripts/testvm only", allow_module_level=True)


def wait_for(pred: Callable[[], T], timeout: float = 60, what: str = "condition") -> T:
    """Polls until `pred` gives something true, and returns that."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def kube_cgroups() -> set[str]:
    """Every cgroup below the kubepods roots (relative paths)."""
    found: set[str] = set()
    for top in ("kubepods", "kubepods.slice"):
        if (CG / top).is_dir():
            found |= {str(p.relative_to(CG)) for p in (CG / top).rglob("*") if p.is_dir()}
    return found


def ns_init_pid(cgroup: Path) -> int:
    """Host PID of the process in `cgroup` that is PID 1 of its own namespace."""
    for pid in (cgroup / "cgroup.procs").read_text().split():
        status = Path(f"/proc/{pid}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        if nspid.split()[1:] == [pid, "1"]:
            return int(pid)
    raise AssertionError(f"no namespace init in {cgroup}")


# The pod's PID 1: reads its own /proc/self/cpuset (a shell builtin, so the reader really is
# PID 1), reports, and waits; SIGTERM is trapped so delivery is observable.
POD_SCRIPT = """
read -r cs < /proc/self/cpuset
echo "$cs" > "$OUT/cpuset"
echo $$ > "$OUT/nspid"
trap 'echo term > "$OUT/term"; exit 0' TERM
{extra}
echo ready > "$OUT/ready"
while :; do sleep 0.1; done
"""


class Pod:
    def __init__(self, node: Node, uid: str, out: Path, proc: subprocess.Popen[str]) -> None:
        self.node, self.uid, self.out, self.proc = node, uid, out, proc

    def wait_ready(self) -> Pod:
        wait_for(
            lambda: (self.out / "ready").exists() or self.proc.poll() is not None,
            what=f"pod {self.uid}",
        )
        assert self.proc.poll() is None, self.proc.communicate()[1]
        return self

    def read(self, name: str) -> str:
        return (self.out / name).read_text().strip()

    def terminate(self, timeout: float = 90) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


class Node:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.kubelet = tmp / "kubelet"
        self.pods: list[Pod] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "PODSIM_KUBELET_DIR": str(self.kubelet)}

    def podsim(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(PODSIM), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )

    def start(
        self, *args: str, uid: str | None = None, extra: str = "", cmd: list[str] | None = None
    ) -> Pod:
        uid = uid or str(uuid.uuid4())
        out = self.tmp / f"pod-{uid}"
        if out.exists():  # another container of the same pod
            out = self.tmp / f"pod-{uid}-{len(self.pods)}"
        out.mkdir()
        env = {**self.env(), "OUT": str(out)}
        command = cmd or ["sh", "-c", POD_SCRIPT.format(extra=extra)]
        proc = subprocess.Popen(
            [sys.executable, str(PODSIM), "run", "--uid", uid, *args, "--", *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        pod = Pod(self, uid, out, proc)
        self.pods.append(pod)
        return pod

    def state(self) -> dict:
        return json.loads((self.kubelet / "cpu_manager_state").read_text())


def uid_forms(uid: str) -> tuple[str, str]:
    return uid, uid.replace("-", "_")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    for pod in n.pods:
        if pod.proc.poll() is None:
            pod.proc.send_signal(signal.SIGTERM)
            try:
                pod.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pod.proc.kill()
                pod.proc.wait()
    # A pod whose podsim was SIGKILLed is cleaned up by the next podsim call, as kubelet would.
    if any(p.proc.returncode == -signal.SIGKILL for p in n.pods):
        n.podsim("state")
    leaked = sorted(
        c for c in kube_cgroups() for pod in n.pods if any(f in c for f in uid_forms(pod.uid))
    )
    assert not leaked, f"cgroups left behind: {leaked}"


@pytest.fixture
def daemon(node: Node, tmp_path: Path) -> Iterator[Daemon]:
    from .pods import Daemon

    d = Daemon(node, tmp_path).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        assert d.stop() == 0
    assert not d.socket.exists(), "the controller left its socket behind"


# --- the fault matrix: each fault scenario says what it did, what it expected and saw ------

INSTANCES = CG / "instances"


def leftovers(uids: list[str], tmp: Path) -> list[str]:
    """What a pod's instance could leave behind: processes, cgroups, taps and sockets."""
    found: list[str] = []
    forms = [f for uid in uids for f in uid_forms(uid)]
    pod_cgroups = [c for c in kube_cgroups() if any(f in c for f in forms)]
    found += [f"cgroup {c}" for c in sorted(pod_cgroups)]
    found += [
        f"cgroup instances/instance-{u}" for u in uids if (INSTANCES / f"instance-{u}").exists()
    ]
    pids: set[int] = set()
    for c in pod_cgroups:
        with_procs = CG / c / "cgroup.procs"
        if with_procs.exists():
            pids |= {int(p) for p in with_procs.read_text().split()}
    if (INSTANCES / "float").exists():
        threads = (INSTANCES / "float" / "cgroup.threads").read_text().split()
        found += [f"thread {t} in float" for t in threads]
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(tmp) in cmdline and " controller " not in cmdline and int(p) != os.getpid():
            pids.add(int(p))
    for pid in sorted(pids):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        found.append(f"process {pid} ({comm})")
    found += [
        f"tap {d.name}"
        for d in sorted(Path("/sys/class/net").iterdir())
        if (d / "tun_flags").exists()
    ]
    for path in sorted(tmp.rglob("*")):
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                found.append(f"socket {path.relative_to(tmp)}")
        except OSError:
            continue
    return found


class Fault:
    def __init__(self) -> None:
        self.name = ""
        self.expected = ""
        self.observed: list[str] = []

    def declare(self, name: str, expected: str) -> None:
        self.name, self.expected = name, expected

    def saw(self, *what: str) -> None:
        self.observed += what


CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator:
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


@pytest.fixture
def fault(request: pytest.FixtureRequest, node: Node, tmp_path: Path) -> Iterator[Fault]:
    """A scenario of the fault matrix. Its row (fault, expected, observed, leftovers, verdict)
    is appended to $FAULT_REPORT, which scripts/faults turns into the dashboard."""
    f = Fault()
    yield f
    report = request.node.stash.get(CALL_REPORT, None)
    passed = report is not None and report.passed
    if report is not None and report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        f.saw("FAILED: " + message.splitlines()[0][:200])
    skipped = report is not None and report.skipped
    if skipped:  # a scenario this kernel cannot have: shown as a skip, with its reason
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
        f.saw("skipped: " + str(reason).removeprefix("Skipped: "))
    found = leftovers([pod.uid for pod in node.pods], tmp_path)
    out = os.environ.get("FAULT_REPORT")
    if out:
        row = {
            "test": request.node.nodeid,
            "fault": f.name or request.node.name,
            "expected": f.expected,
            "observed": "; ".join(f.observed),
            "leftovers": found,
            "passed": passed and not found,
            "skipped": skipped and not found,
        }
        with open(out, "a") as report_file:
            report_file.write(json.dumps(row) + "\n")
    if report is None or report.passed:  # a failed test has said what went wrong already
        assert not found, f"left behind: {found}"
