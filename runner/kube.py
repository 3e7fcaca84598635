"""What kubelet and the container runtime tell us, parsed: cgroup paths and cpu_manager_state.

Pure functions only; the callers read the files.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Literal

import attrs

from runner import cpus
from runner.cpus import CpuSet

Driver = Literal["systemd", "cgroupfs", "unknown"]  # unknown: hidden by a cgroup namespace
QoS = Literal["guaranteed", "burstable", "besteffort"]

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_STATIC_UID = re.compile(r"^[0-9a-f]{32}$")  # static (mirror) pods: a hash, no dashes
# systemd: "kubepods-pod<uid_>.slice", "kubepods-burstable-pod<uid_>.slice", and with a custom
# kubelet cgroup root the same names behind a longer prefix ("kubelet-kubepods-pod….slice").
_SYSTEMD_POD = re.compile(r"^(?:[a-z0-9_.-]+-)?pod([0-9a-f_]{32,36})\.slice$")
_CGROUPFS_POD = re.compile(r"^pod([0-9a-f-]{32,36})$")
# kubelet's pods live under its "kubepods" cgroup ("kubepods", "kubepods.slice", or behind a
# custom root, "kubelet-kubepods.slice"); a pod-like name anywhere else is not a pod.
_KUBEPODS = re.compile(r"^(?:[a-z0-9_.-]+-)?kubepods(?:[.-].*)?$")
_CONTAINER = [
    (re.compile(r"^cri-containerd-([0-9a-f]{64})\.scope$"), "containerd"),
    (re.compile(r"^crio-([0-9a-f]{64})(?:\.scope)?$"), "crio"),
    (re.compile(r"^docker-([0-9a-f]{64})\.scope$"), "docker"),
    (re.compile(r"^([0-9a-f]{64})$"), "containerd"),
]


class KubeError(ValueError):
    """Input that is not what kubelet or the runtime would have produced."""


@attrs.frozen
class PodCgroup:
    """The container's cgroup and what its path says about the pod."""

    path: str  # absolute within the cgroup hierarchy, e.g. "/kubepods.slice/…/cri-….scope"
    pod_uid: str
    container_id: str
    driver: Driver
    runtime: str
    qos: QoS


def normalise_uid(raw: str) -> str | None:
    uid = raw.replace("_", "-")
    return uid if _UUID.match(uid) or _STATIC_UID.match(uid) else None


def _container(part: str) -> tuple[str, str] | None:
    for pattern, runtime in _CONTAINER:
        if m := pattern.match(part):
            return m.group(1), runtime
    return None


def parse_pod_cgroup(path: str) -> PodCgroup:
    """Find the pod and container in a container's cgroup path (driver, runtime, QoS)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise KubeError(
            "cgroup path '/': the container has a private cgroup namespace, which hides its "
            "place under kubepods (run it in the host's cgroup namespace)"
        )
    for i, part in enumerate(parts):
        driver: Driver
        if m := _SYSTEMD_POD.match(part):
            driver = "systemd"
        elif m := _CGROUPFS_POD.match(part):
            driver = "cgroupfs"
        else:
            continue
        if not any(_KUBEPODS.match(p) for p in parts[:i]):
            raise KubeError(f"cgroup path {path!r} names a pod outside kubelet's kubepods tree")
        uid = normalise_uid(m.group(1))
        if uid is None:
            raise KubeError(f"cgroup path {path!r}: {part!r} holds no valid pod UID")
        if i + 1 >= len(parts):
            raise KubeError(f"cgroup path {path!r} names a pod but no container")
        container = _container(parts[i + 1])
        if container is None:
            raise KubeError(f"cgroup path {path!r}: {parts[i + 1]!r} is not a container cgroup")
        container_id, runtime = container
        above = " ".join(parts[: i + 1])
        qos: QoS = (
            "burstable"
            if "burstable" in above
            else "besteffort"
            if "besteffort" in above
            else "guaranteed"
        )
        return PodCgroup("/" + "/".join(parts), uid, container_id, driver, runtime, qos)
    raise KubeError(f"cgroup path {path!r} is not inside a Kubernetes pod")


def own_cgroup_path(proc_cpuset: str | None, proc_cgroup: str | None) -> str:
    """The cgroup v2 path of a process: /proc/<pid>/cpuset, else the "0::" line of
    /proc/<pid>/cgroup (kernels built without CONFIG_CPUSETS have no cpuset file)."""
    if proc_cpuset is not None and proc_cpuset.strip().startswith("/"):
        return proc_cpuset.strip()
    for line in (proc_cgroup or "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    raise KubeError("no cgroup v2 path in /proc/self/cpuset or /proc/self/cgroup (cgroup v1 host?)")


def in_namespace(pod_uid: str, container_cpus_path: str = "/") -> PodCgroup:
    """The container as it sees itself in a private cgroup namespace (an unprivileged
    container): its cgroup is "/", and the pod is known by the UID it is told."""
    uid = normalise_uid(pod_uid)
    if uid is None:
        raise KubeError(f"--pod-uid {pod_uid!r} is not a pod UID")
    return PodCgroup(container_cpus_path, uid, "", "unknown", "", "guaranteed")


def view(path: str, ns_root: str) -> str:
    """A cgroup path as a process in a cgroup namespace rooted at `ns_root` sees it in
    /proc/<pid>/cgroup: relative to the root, with ".." above it."""
    if ns_root == "/":
        return path
    rel = posixpath.relpath(path, ns_root)
    return "/" if rel == "." else "/" + rel


def on_node(path: str, ns_root: str) -> str:
    """The node's path of a cgroup that a process in a cgroup namespace rooted at `ns_root`
    sees as `path` (the inverse of `view`)."""
    if ns_root == "/":
        return path
    return posixpath.normpath(posixpath.join(ns_root, path.lstrip("/")))


@attrs.frozen
class KubeletState:
    """cpu_manager_state (kubelet's checkpoint, v2 format). The checksum is not verified: it
    hashes a Go struct dump that cannot be reproduced faithfully outside kubelet."""

    policy: str
    default_cpus: CpuSet
    entries: dict[str, dict[str, CpuSet]]

    def container_with(self, uid: str, cpu_set: CpuSet) -> str | None:
        """The name of the pod's container whose exclusive allocation is exactly `cpu_set`.
        Each container has its own entry (sidecars, an init container's leftover): a
        container's allocation is its entry, never the union over the pod."""
        for name, allocated in sorted(self.entries.get(uid, {}).items()):
            if allocated == cpu_set:
                return name
        return None


def check_static(state: KubeletState) -> None:
    """kubelet dedicates CPUs to containers only under its static CPU manager policy; under
    any other, a Guaranteed pod's CPUs are shared with everything and pinning isolates nothing.
    The one check of the policy, for the runner and the controller alike."""
    if state.policy != "static":
        raise KubeError(
            f"kubelet's CPU manager policy in cpu_manager_state is {state.policy!r}, not "
            "'static': it dedicates no CPUs to pods (set cpuManagerPolicy: static in the "
            "node's kubelet configuration)"
        )


def parse_cpu_manager_state(text: str) -> KubeletState:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise KubeError(f"cpu_manager_state is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise KubeError("cpu_manager_state is not a JSON object")
    policy = doc.get("policyName")
    default = doc.get("defaultCpuSet")
    entries = doc.get("entries") or {}
    if not isinstance(policy, str) or not isinstance(default, str):
        raise KubeError("cpu_manager_state lacks policyName or defaultCpuSet")
    if not isinstance(entries, dict) or not all(
        isinstance(v, dict) and all(isinstance(s, str) for s in v.values())
        for v in entries.values()
    ):
        raise KubeError("cpu_manager_state has malformed entries")
    try:
        return KubeletState(
            policy,
            cpus.parse(default),
            {uid: {name: cpus.parse(s) for name, s in c.items()} for uid, c in entries.items()},
        )
    except cpus.CpuListError as e:
        raise KubeError(f"cpu_manager_state: {e}") from None


# kubelet's CPU weights (pkg/kubelet/cm): requests in millicores become cgroup v1 shares
# (MilliCPUToShares), and shares become cgroup v2 cpu.weight (CpuSharesToCpuWeight).
MIN_SHARES, MAX_SHARES = 2, 262144


def milli_cpu_to_shares(milli: int) -> int:
    return min(MAX_SHARES, max(MIN_SHARES, milli * 1024 // 1000))


def shares_to_weight(shares: int) -> int:
    return 1 + ((shares - 2) * 9999) // 262142


def cpu_weight(milli: int) -> int:
    """The cpu.weight kubelet gives a cgroup whose pods request `milli` millicores: a pod's
    own cgroup, or kubepods for the node's allocatable CPUs."""
    return shares_to_weight(milli_cpu_to_shares(milli))
