from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import kube
from runner.node import layout

UID = "0a1b2c3d-1111-2222-3333-444455556666"
U_ = UID.replace("-", "_")
STATIC = "6d2f3ac0b1c24e1f9f0aa1f0c3b2d4e5"
CID = "c" * 64


@pytest.mark.parametrize(
    ("path", "driver", "runtime", "qos", "uid"),
    [
        (
            f"/kubepods.slice/kubepods-pod{U_}.slice/cri-containerd-{CID}.scope",
            "systemd",
            "containerd",
            "guaranteed",
            UID,
        ),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/"
            f"cri-containerd-{CID}.scope",
            "systemd",
            "containerd",
            "burstable",
            UID,
        ),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/"
            f"crio-{CID}.scope",
            "systemd",
            "crio",
            "besteffort",
            UID,
        ),
        (
            f"/kubepods.slice/kubepods-pod{U_}.slice/crio-{CID}.scope/container",
            "systemd",
            "crio",
            "guaranteed",
            UID,
        ),
        (
            f"/kubepods.slice/kubepods-pod{STATIC}.slice/cri-containerd-{CID}.scope",
            "systemd",
            "containerd",
            "guaranteed",
            STATIC,
        ),
        (
            f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
            f"kubelet-kubepods-burstable-pod{U_}.slice/cri-containerd-{CID}.scope",
            "systemd",
            "containerd",
            "burstable",
            UID,
        ),
        (f"/kubepods/pod{UID}/{CID}", "cgroupfs", "containerd", "guaranteed", UID),
        (f"/kubepods/burstable/pod{UID}/{CID}", "cgroupfs", "containerd", "burstable", UID),
        (f"/kubepods/besteffort/pod{STATIC}/crio-{CID}", "cgroupfs", "crio", "besteffort", STATIC),
        (
            f"/kubepods.slice/kubepods-pod{U_}.slice/docker-{CID}.scope",
            "systemd",
            "docker",
            "guaranteed",
            UID,
        ),
    ],
)
def test_parse_pod_cgroup(path: str, driver: str, runtime: str, qos: str, uid: str) -> None:
    pod = kube.parse_pod_cgroup(path)
    assert (pod.pod_uid, pod.container_id, pod.driver, pod.runtime, pod.qos) == (
        uid,
        CID,
        driver,
        runtime,
        qos,
    )
    assert pod.path == path


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/", "private cgroup namespace"),
        ("/system.slice/foo.service", "not inside a Kubernetes pod"),
        (f"/kubepods.slice/kubepods-pod{U_}.slice", "names a pod but no container"),
        (f"/kubepods/pod{UID}/notacontainer", "is not a container cgroup"),
        ("/kubepods/pod0a1b2c3d-1111-2222-3333-44445555666z/" + CID, "not inside"),
        (
            "/kubepods.slice/kubepods-pod0a1b2c3d_1111_2222_3333_44445555666.slice/x",
            "holds no valid pod UID",
        ),
        (f"/user.slice/x-pod{U_}.slice/{CID}", "outside kubelet's kubepods tree"),
        (f"/pod{UID}/{CID}", "outside kubelet's kubepods tree"),
    ],
)
def test_parse_pod_cgroup_rejects(path: str, message: str) -> None:
    with pytest.raises(kube.KubeError, match=message):
        kube.parse_pod_cgroup(path)


def test_own_cgroup_path_prefers_cpuset_and_falls_back_to_unified_line() -> None:
    assert kube.own_cgroup_path("/a/b\n", "0::/x\n") == "/a/b"
    assert kube.own_cgroup_path(None, "1:name=systemd:/y\n0::/x/y\n") == "/x/y"
    with pytest.raises(kube.KubeError, match="cgroup v1 host"):
        kube.own_cgroup_path(None, "4:cpuset:/\n")


def test_cpu_manager_state() -> None:
    text = json.dumps(
        {
            "policyName": "static",
            "defaultCpuSet": "0,3",
            "entries": {UID: {"compute": "1-2"}},
            "checksum": 1,
        }
    )
    state = kube.parse_cpu_manager_state(text)
    assert state.policy == "static"
    assert state.default_cpus == {0, 3}
    assert state.container_with(UID, frozenset({1, 2})) == "compute"
    assert state.container_with(UID, frozenset({1})) is None
    assert state.container_with("other", frozenset({1, 2})) is None
    none = kube.parse_cpu_manager_state('{"policyName":"none","defaultCpuSet":"","checksum":1}')
    assert none.default_cpus == frozenset() and none.entries == {}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"policyName":"static"}',
        '{"policyName":"static","defaultCpuSet":"x"}',
        '{"policyName":"static","defaultCpuSet":"0","entries":{"u":"0"}}',
    ],
)
def test_cpu_manager_state_rejects(text: str) -> None:
    with pytest.raises(kube.KubeError):
        kube.parse_cpu_manager_state(text)


def test_only_the_static_policy_passes_the_policy_check() -> None:
    static = kube.parse_cpu_manager_state('{"policyName":"static","defaultCpuSet":"0"}')
    kube.check_static(static)
    none = kube.parse_cpu_manager_state('{"policyName":"none","defaultCpuSet":""}')
    with pytest.raises(kube.KubeError, match="cpuManagerPolicy: static"):
        kube.check_static(none)


@pytest.mark.parametrize(
    ("milli", "weight"),
    [(0, 1), (1000, 39), (2000, 79), (4000, 157), (64000, 2500), (10**9, 10000)],
)
def test_cpu_weight_is_kubelets(milli: int, weight: int) -> None:
    # MilliCPUToShares then CpuSharesToCpuWeight (pkg/kubelet/cm), as kubelet writes them.
    assert kube.cpu_weight(milli) == weight


def test_the_root_weighs_what_its_vm_pods_would_and_never_less_than_the_default() -> None:
    assert layout.root_weight(frozenset()) == 100
    assert layout.root_weight(frozenset({1, 2})) == 100  # kubelet's 79
    assert layout.root_weight(frozenset(range(1, 8))) == kube.cpu_weight(7000) == 274
    assert layout.root_weight(frozenset(range(64))) == 2500


def test_paths_as_a_private_cgroup_namespace_sees_them() -> None:
    root = "/kubepods/pod0a1b2c3d-1111-2222-3333-444455556666/" + "c" * 64
    assert kube.view("/instances/float", root) == "/../../../instances/float"
    assert kube.view(root, root) == "/"
    assert kube.view(root + "/sub", root) == "/sub"
    assert kube.view("/instances/float", "/") == "/instances/float"


SEGMENT = st.text(alphabet="abcXYZ019-_.:@", min_size=1, max_size=12).filter(
    lambda x: x not in (".", "..")
)
CGROUP = st.lists(SEGMENT, max_size=5).map(lambda parts: "/" + "/".join(parts))


@given(path=CGROUP, root=CGROUP)
def test_a_path_seen_from_a_namespace_names_the_same_cgroup_on_the_node(
    path: str, root: str
) -> None:
    """What a pod in a private cgroup namespace reads in /proc is turned back into the node's
    name for it (inspect from inside the pod shows the node's paths)."""
    assert kube.on_node(kube.view(path, root), root) == path


def test_a_pod_known_by_the_uid_it_is_told() -> None:
    pod = kube.in_namespace("0A1B2C3D-1111-2222-3333-444455556666".lower())
    assert (pod.path, pod.pod_uid, pod.driver) == (
        "/",
        "0a1b2c3d-1111-2222-3333-444455556666",
        "unknown",
    )
    with pytest.raises(kube.KubeError):
        kube.in_namespace("../float")
