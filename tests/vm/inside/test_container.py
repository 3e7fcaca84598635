"""The image under a real OCI runtime: podman and crun run the controller and a VM pod from
the image archive as kubelet and containerd would (the pod's cgroup under kubepods with
podsim's naming and cpu_manager_state, the host's cgroup namespace, privileged, a PID
namespace of its own, the container's cpuset set to the pod's CPUs). Everything is checked
from outside the containers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, Node, Pod, kube_cgroups, uid_forms, wait_for
from .pods import (
    FLOAT,
    INSTANCES,
    assert_placed,
    capabilities,
    cgroupfs_read_only,
    container_of,
    cpu_list,
    float_cpus,
    float_of,
)
from .rpc_probe import exchange

ARCHIVE = REPO / ".cache" / "image" / "instance-runner.oci.tar"
IMAGE = "localhost/instance-runner:dev"
SHIM = Path(__file__).with_name("oci_runtime.py")
PROBE_SCRIPT = Path(__file__).with_name("rpc_probe.py")
BLOB_CACHE = Path("/var/lib/containers/cache")
ONLINE = set(range(4))
HEALTH_PORT = 9464


class Podman:
    """podman with a store of its own on tmpfs and crun behind the cgroup shim."""

    def __init__(self, store: Path) -> None:
        self.base = [
            "podman",
            "--root",
            str(store / "root"),
            "--runroot",
            str(store / "runroot"),
            "--storage-driver",
            "overlay",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            str(SHIM),
        ]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stderr}"
        return r

    def run_argv(self, name: str, *args: str) -> list[str]:
        """`podman run` in the container cgroup and on the CPUs podsim names (--oci)."""
        script = (
            'exec "$@" --annotation podsim.cgroup="$PODSIM_CGROUP" '
            '--cpuset-cpus "$PODSIM_CPUS" ' + " ".join(f"'{a}'" for a in args)
        )
        return ["sh", "-c", script, "sh", *self.base, "run", "--name", name]


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    assert ARCHIVE.exists(), f"{ARCHIVE} is missing: scripts/image builds it"
    store = Path(f"/run/podman-{os.getpid()}")  # tmpfs: overlay's upper dirs cannot be overlay
    # podman keeps a blob cache in /var/lib/containers/cache whatever its --root: a private
    # one, so that the host's (seen through the VM's 9p root, and written by a build on the
    # host meanwhile) is never read half-written.
    BLOB_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(BLOB_CACHE)], check=True)
    pm = Podman(store)
    try:
        pm("load", "--quiet", "--input", str(ARCHIVE), timeout=600)
        yield pm
    finally:
        subprocess.run([*pm.base, "rm", "--all", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run(["umount", str(BLOB_CACHE)], capture_output=True)


class Cluster:
    """The node's controller pod (a DaemonSet's: burstable, hostPID) and its socket."""

    def __init__(self, node: Node, tmp: Path, podman: Podman, pod_capabilities: list[str]) -> None:
        self.node, self.tmp, self.podman = node, tmp, podman
        self.pod_capabilities = pod_capabilities  # deploy/example-vm.yaml's, and no other
        self.sockets = Path(f"/run/irn-{os.getpid()}")  # short: it holds a Unix socket
        self.sockets.mkdir()
        self.socket = self.sockets / "controller.sock"
        self.controller: Pod | None = None

    def ready(self) -> bool:
        """The controller's readiness, asked as kubelet's probe asks it, and its socket."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/readyz", timeout=5) as r:
                if r.status != 200:
                    return False
            doc = b'{"jsonrpc": "2.0", "method": "health", "id": 1}\n'
            answer = exchange(str(self.socket), doc, timeout=5)
        except OSError:
            return False
        return bool(answer and answer.get("result", {}).get("status") == "ok")

    def start_controller(self) -> None:
        self.node.podsim("state")  # kubelet has written its state before the DaemonSet runs
        argv = self.podman.run_argv(
            f"ctl-{os.getpid()}",
            "--privileged",
            "--pid=host",
            "--cgroupns=host",
            "--network=host",  # its probe port, reachable from the node as kubelet would
            f"--env=INSTANCE_RUNNER_HEALTH_ADDRESS=127.0.0.1:{HEALTH_PORT}",
            "--volume=/sys/fs/cgroup:/sys/fs/cgroup",
            f"--volume={self.node.kubelet}:/var/lib/kubelet:ro",
            f"--volume={self.sockets}:/run/instance-runner",
            IMAGE,
            "controller",
            "--idle-timeout=1",
            "--resync-interval=2",
        )
        self.controller = self.node.start("--qos", "burstable", "--oci", cmd=argv)
        wait_for(
            lambda: self.ready() or self.controller.proc.poll() is not None,  # type: ignore[union-attr]
            timeout=180,
            what="the controller container to answer",
        )
        assert self.controller.proc.poll() is None, self.controller.proc.communicate()

    def start_vm_pod(
        self, cpus: str, socket_as_file: bool = False, privileged: bool = True
    ) -> VMPod:
        uid = str(uuid.uuid4())
        work = self.tmp / uid
        (work / "spec").mkdir(parents=True)
        (work / "run").mkdir()
        spec = {"name": "vm", "vcpus": len(cpu_list(cpus)), "memory_mib": 64, "accel": "tcg"}
        (work / "spec" / "spec.json").write_text(json.dumps(spec))
        name = f"vm-{uid[:8]}"
        # Privileged: the host's cgroup namespace. Not privileged (controller mode): a private
        # one, the cgroupfs read-only, the example pod's capabilities alone, no way to gain
        # more; the pod is named by the Downward API's metadata.uid, as the manifest does.
        security = (
            ["--privileged", "--cgroupns=host"]
            if privileged
            else [
                "--cgroupns=private",
                "--security-opt=no-new-privileges",
                "--cap-drop=all",
                *(f"--cap-add={c}" for c in self.pod_capabilities),
                f"--env=INSTANCE_RUNNER_POD_UID={uid}",
            ]
        )
        argv = self.podman.run_argv(
            name,
            *security,
            "--pid=private",
            "--network=none",
            f"--volume={work / 'spec'}:/etc/instance-runner:ro",
            f"--volume={self.node.kubelet}:/var/lib/kubelet:ro",
            f"--volume={self.socket}:/run/instance-runner-node/controller.sock"
            if socket_as_file
            else f"--volume={self.sockets}:/run/instance-runner-node:ro",
            f"--volume={work / 'run'}:/run/instance-runner",
            "--env=INSTANCE_RUNNER_SPEC=/etc/instance-runner/spec.json",
            "--env=INSTANCE_RUNNER_CONTROLLER_SOCKET=/run/instance-runner-node/controller.sock",
            "--env=INSTANCE_RUNNER_SHUTDOWN_TIMEOUT=2",
            IMAGE,
        )  # the image's own command: `instance-runner run`
        pod = self.node.start("--cpus", cpus, "--driver", "cgroupfs", "--oci", uid=uid, cmd=argv)
        return VMPod(self, pod, name, work / "run" / uid / "ready", cpu_list(cpus))


class VMPod:
    def __init__(self, cluster: Cluster, pod: Pod, name: str, ready: Path, cpus: set[int]):
        self.cluster, self.pod, self.name, self.ready_file, self.cpus = (
            cluster,
            pod,
            name,
            ready,
            cpus,
        )

    def wait_ready(self) -> dict:
        wait_for(
            lambda: self.ready_file.exists() or self.pod.proc.poll() is not None,
            timeout=180,
            what="the runner in its container to be ready",
        )
        assert self.pod.proc.poll() is None, self.pod.proc.communicate()
        return json.loads(self.ready_file.read_text())

    def pid1(self) -> int:
        """The container's PID 1, as the node sees it: the runner, as the runtime started it."""
        r = self.cluster.podman("inspect", "--format", "{{.State.Pid}}", self.name)
        return int(r.stdout)

    def exit_code(self) -> int:
        r = self.cluster.podman("inspect", "--format", "{{.State.ExitCode}}", self.name)
        return int(r.stdout)


def nothing_left(uid: str, sockets: Path) -> list[str]:
    found = [f"cgroup {c}" for c in kube_cgroups() if any(f in c for f in uid_forms(uid))]
    if (INSTANCES / f"instance-{uid}").exists():
        found.append(f"cgroup instances/instance-{uid}")
    if FLOAT.exists() and (threads := (FLOAT / "cgroup.threads").read_text().split()):
        found.append(f"threads {threads} in float")
    found += [f"file {p}" for p in sockets.iterdir() if p.name != "controller.sock"]
    return found


@pytest.fixture(scope="module")
def cluster(
    podman: Podman, tmp_path_factory: pytest.TempPathFactory, vm_pod_capabilities: list[str]
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    node = Node(tmp)
    c = Cluster(node, tmp, podman, vm_pod_capabilities)
    c.start_controller()
    yield c
    for pod in node.pods:
        if pod.proc.poll() is None:
            pod.terminate(timeout=60)
    assert c.controller is not None
    assert c.controller.proc.returncode == 0, c.controller.proc.communicate()
    podman("rm", "--all")
    assert not c.socket.exists(), "the controller left its socket behind"
    uids = [f for pod in node.pods for f in uid_forms(pod.uid)]
    assert not [x for x in kube_cgroups() if any(u in x for u in uids)]
    c.sockets.rmdir()


def test_vm_pod_is_pinned_and_stops_clean_with_podman_stop(cluster: Cluster) -> None:
    vm = cluster.start_vm_pod("1-2")
    ready = vm.wait_ready()
    runner = vm.pid1()
    status = Path(f"/proc/{runner}/status").read_text()
    assert f"NSpid:\t{runner}\t1" in status, "the runner is not PID 1 of its container"
    assert Path(f"/proc/{runner}/cmdline").read_bytes().split(b"\0")[1:3] == [
        b"/opt/instance-runner/bin/instance-runner",
        b"run",
    ]
    assert_placed(runner, vm.pod.uid, vm.cpus, ONLINE)
    assert {v["cpu"] for v in ready["vcpus"]} == vm.cpus
    # The container's cgroup has kubelet's naming, and the runtime set its cpuset as asked.
    container = container_of(vm.pod.uid)
    assert container.parent.name == f"pod{vm.pod.uid}" and len(container.name) == 64
    assert cpu_list((container / "cpuset.cpus").read_text()) == vm.cpus

    cluster.podman("stop", "--time", "30", vm.name, timeout=60)
    assert vm.pod.proc.wait(timeout=60) == 0, vm.pod.proc.communicate()
    assert vm.exit_code() == 0
    cluster.podman("rm", vm.name)
    assert not Path(f"/proc/{runner}").exists()
    assert not vm.ready_file.exists()
    assert nothing_left(vm.pod.uid, cluster.sockets) == []
    wait_for(lambda: float_cpus() == ONLINE, what="float to get the pod's CPUs back")


def test_unprivileged_vm_pod_is_placed_by_the_controller(cluster: Cluster) -> None:
    """podman without --privileged: a private cgroup namespace, the cgroupfs read-only, the
    example pod's capabilities alone. The controller makes every write; the invariants hold
    from outside."""
    vm = cluster.start_vm_pod("1-2", privileged=False)
    ready = vm.wait_ready()
    runner = vm.pid1()
    assert cgroupfs_read_only(runner)
    assert not capabilities(runner) & (1 << 21 | 1 << 23)  # SYS_ADMIN, SYS_NICE
    assert bin(capabilities(runner)).count("1") == len(cluster.pod_capabilities)
    # A cgroup namespace of its own, and in float as the node sees it.
    assert os.readlink(f"/proc/{runner}/ns/cgroup") != os.readlink("/proc/self/ns/cgroup")
    cgroup = Path(f"/proc/{runner}/cgroup").read_text().strip()
    assert cgroup == f"0::{float_of(vm.pod.uid)}"
    assert_placed(runner, vm.pod.uid, vm.cpus, ONLINE)
    assert {v["cpu"] for v in ready["vcpus"]} == vm.cpus

    cluster.podman("stop", "--time", "30", vm.name, timeout=60)
    assert vm.pod.proc.wait(timeout=60) == 0, vm.pod.proc.communicate()
    assert vm.exit_code() == 0
    cluster.podman("rm", vm.name)
    assert nothing_left(vm.pod.uid, cluster.sockets) == []
    wait_for(lambda: float_cpus() == ONLINE, what="float to get the pod's CPUs back")


def test_from_inside_an_unprivileged_vm_pod_another_is_out_of_reach(cluster: Cluster) -> None:
    """As root in the container, exec'd into it as kubectl exec would: the host's cgroup
    files, another pod's threads, its CPUs and a TID not its own are all refused."""
    victim = cluster.start_vm_pod("3")
    attacker = cluster.start_vm_pod("1-2", privileged=False)
    victim.wait_ready()
    attacker.wait_ready()
    instance = INSTANCES / f"instance-{victim.pod.uid}"
    (vcpu,) = (int(t) for t in (instance / "cgroup.threads").read_text().split())
    qemu = int(
        next(
            x
            for x in Path(f"/proc/{vcpu}/status").read_text().splitlines()
            if x.startswith("Tgid:")
        ).split()[1]
    )
    # Into the pod's namespaces and root, as root with the pod's capabilities alone, as
    # `podman exec` would put it. (podman exec itself cannot enter a container here: the
    # test VM's init chroots into its root, so crun makes containers without pivot_root, and
    # its exec lands in the VM's initramfs.) The exec'd process would join the container
    # cgroup; the controller would move it to float: it is known by its PID namespace.
    env = f"INSTANCE_RUNNER_POD_UID={attacker.pod.uid}"
    probe = subprocess.run(
        [
            "nsenter",
            "--target",
            str(attacker.pid1()),
            "--mount",
            "--pid",
            "--cgroup",
            "--root",
            "--wd",
            "--",
            "env",
            env,
            "setpriv",
            f"--bounding-set=-all,{','.join('+' + c for c in cluster.pod_capabilities)}",
            "--inh-caps=-all",
            "--",
            "/opt/instance-runner/bin/python",
            "-",
            "tenant",
            "/run/instance-runner-node/controller.sock",
            victim.pod.uid,
            str(qemu),
            str(vcpu),
        ],
        input=PROBE_SCRIPT.read_text(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        for vm in (attacker, victim):
            cluster.podman("stop", "--time", "30", vm.name, timeout=60)
            cluster.podman("rm", vm.name)
    assert probe.returncode == 0, probe.stderr
    answers = {r["case"]: r["answer"] for r in map(json.loads, probe.stdout.splitlines())}
    # Its cgroup namespace shows its own cgroup alone, read-only: the node's are not there.
    for case in ("write the victim's instance cgroup", "write float's cpuset"):
        assert answers[case] in ("ENOENT", "EROFS"), (case, answers[case])
    assert answers["write the victim's vCPU into our container"] == "EROFS"
    assert answers["pin the victim's vCPU"] == "ESRCH"
    for case in (
        "register the victim's CPUs",
        "move for the victim",
        "read the victim's status",
        "move the victim's QEMU",
    ):
        assert answers[case]["error"]["code"] == -32001, (case, answers[case])
    # Its own vCPUs are placed already: a placement is refused before anything is looked up.
    for case in ("place the victim's vCPU", "place the victim's QEMU", "place on the victim's CPU"):
        assert answers[case]["error"]["code"] in (-32001, -32002), (case, answers[case])
    # (float holds neither pod's CPUs: each is checked against the CPUs the other leaves.)
    assert_placed(victim.pid1(), victim.pod.uid, victim.cpus, ONLINE - attacker.cpus)
    assert_placed(attacker.pid1(), attacker.pod.uid, attacker.cpus, ONLINE - victim.cpus)
    for vm in (attacker, victim):
        cluster.podman("stop", "--time", "30", vm.name, timeout=60)
        assert vm.pod.proc.wait(timeout=60) == 0, vm.pod.proc.communicate()
        cluster.podman("rm", vm.name)
    for vm in (attacker, victim):  # float is shared: empty once both are gone
        assert nothing_left(vm.pod.uid, cluster.sockets) == []


def test_crashed_vm_pod_leaves_nothing_once_removed(cluster: Cluster) -> None:
    vm = cluster.start_vm_pod("3")
    vm.wait_ready()
    runner = vm.pid1()
    assert_placed(runner, vm.pod.uid, vm.cpus, ONLINE)
    os.kill(runner, signal.SIGKILL)  # PID 1 dies: the runtime's PID namespace takes the rest
    assert vm.pod.proc.wait(timeout=60) == 137, vm.pod.proc.communicate()
    cluster.podman("rm", vm.name)
    # Nobody undid the runner's steps: the controller sweeps the gone pod's instance cgroup.
    wait_for(
        lambda: nothing_left(vm.pod.uid, cluster.sockets) == [],
        timeout=60,
        what="the crashed pod's cgroups to go",
    )
    wait_for(lambda: float_cpus() == ONLINE, what="float to get the pod's CPU back")


def test_socket_mounted_as_a_file_is_refused(cluster: Cluster) -> None:
    vm = cluster.start_vm_pod("1", socket_as_file=True)
    code = vm.pod.proc.wait(timeout=120)
    _out, err = vm.pod.proc.communicate()
    assert code == 1, err
    errors = [json.loads(line) for line in err.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and "is mounted as a file" in errors[0]["error"], err
    cluster.podman("rm", vm.name)
    assert nothing_left(vm.pod.uid, cluster.sockets) == []
