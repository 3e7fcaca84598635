"""Every spec in docs/examples loads and builds; its command lines match the golden files
(UPDATE_GOLDEN=1 rewrites them after a deliberate change: review the diff)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runner import cloudinit, kube, netplan, netrules, placement, plan, spec, topology
from runner.argv import Wiring, dnsmasq_argv, passt_argv, qemu_argv, virtiofsd_argv
from runner.netrules import Port

from . import sysfs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.json"))
GOLDEN = Path(__file__).with_name("golden")
# Two sockets of 4 cores x 2 threads (siblings n, n+8), a GPU for VFIO on node 1; the pod
# holds node 1's first CPUs, whole cores first.
HOST = topology.parse(sysfs.host(2, 4, 2, devices={"0000:65:00.0": sysfs.gpu(1, 30)}))


POD = kube.parse_pod_cgroup(f"/kubepods/pod0a1b2c3d-1111-2222-3333-444455556666/{'c' * 64}")


def layout(s: spec.InstanceSpec) -> placement.Layout:
    held = placement.choose(HOST, HOST.cpus_of_node(1), s.vcpus)
    return plan.make_plan(s, POD, held, None, HOST).layout


def command_lines(s: spec.InstanceSpec) -> str:
    """All the command lines an instance starts with, for a fixed wiring."""
    wiring = Wiring(
        qmp_fd=3,
        console_fd=4 if s.console.stdout or s.console.log_file else None,
        nic_fds=tuple(10 + i for i in range(len(s.nics))),
        streams=frozenset(i for i, n in enumerate(s.nics) if n.binding == "passt"),
        share_sockets=tuple(f"/run/instance-runner/fs{i}.sock" for i in range(len(s.shares))),
        seed="/run/instance-runner/seed.iso" if s.cloud_init is not None else None,
        uefi=(
            ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/run/instance-runner/efi-vars.fd")
            if s.boot is not None and s.boot.firmware == "uefi"
            else None
        ),
    )
    accel = "kvm" if s.accel == "kvm" else "tcg"
    blocks = [
        ("qemu, isolated", qemu_argv(s, accel, wiring, layout(s))),
        ("qemu, isolation off", qemu_argv(s, accel, wiring)),
    ]
    for i, nic in enumerate(s.nics):
        if nic.makes_tap:
            blocks.append((f"dnsmasq {i}", dnsmasq_argv(s, i)))
        if nic.binding == "passt":
            blocks.append((f"passt {i}", passt_argv(s, i, 20 + i, "passt", [Port(port=9464)])))
    if s.cloud_init is not None:
        files = cloudinit.seed_files(s, b"#cloud-config\n", None)
        for name, data in files.items():
            blocks.append((f"seed {name}", data.decode().splitlines()))
    net = netplan.plan(s, (Port(port=9464),))
    if not net.empty:
        doc = spec.converter.unstructure(net)
        blocks.append(("network plan", json.dumps(doc, indent=1).splitlines()))
    if net.masquerade is not None:
        blocks.append(("nft", json.dumps(netrules.ruleset(net.masquerade), indent=1).splitlines()))
    if net.egress:
        limits = json.dumps(netrules.limits(net.egress), indent=1)
        blocks.append(("nft limits", limits.splitlines()))
    for i, share in enumerate(s.shares):
        for flavour in ("c", "rust"):
            blocks.append(
                (
                    f"virtiofsd {i} ({flavour})",
                    virtiofsd_argv(
                        share, wiring.share_sockets[i], "/usr/lib/qemu/virtiofsd", flavour
                    ),
                )
            )
    return "".join(f"# {name}\n" + "".join(f"{a}\n" for a in argv) for name, argv in blocks)


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_builds_as_golden(example: Path) -> None:
    s = spec.load(example.read_text(), source=example.name)
    text = command_lines(s)
    golden = GOLDEN / f"{example.stem}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file for {example.name}: run with UPDATE_GOLDEN=1"
    assert text == golden.read_text()


def test_virtiofsd_sandboxes_with_chroot_where_namespaces_are_not_allowed() -> None:
    share = spec.load(
        '{"name": "v", "vcpus": 1, "memory_mib": 64, "shares": [{"source": "/srv", "tag": "d"}]}'
    )
    (one,) = share.shares
    c = virtiofsd_argv(one, "/run/s.sock", "virtiofsd", "c", "chroot")
    assert c[-2:] == ["-o", "sandbox=chroot"]
    assert "sandbox=chroot" not in virtiofsd_argv(one, "/run/s.sock", "virtiofsd", "c")
    rust = virtiofsd_argv(one, "/run/s.sock", "virtiofsd", "rust", "chroot")
    assert "--sandbox=chroot" in rust


def test_a_read_only_share_on_a_read_only_mount_needs_no_bind_mount() -> None:
    """A volume mounted readOnly into the pod: the C daemon serves it as it is, which a pod
    without CAP_SYS_ADMIN can do (chroot sandbox)."""
    s = spec.load(
        '{"name": "v", "vcpus": 1, "memory_mib": 64,'
        ' "shares": [{"source": "/srv", "tag": "d", "read_only": true}]}'
    )
    (one,) = s.shares
    bound = virtiofsd_argv(one, "/run/s.sock", "virtiofsd", "c")
    assert bound[:2] == ["unshare", "--mount"] and "mount --bind -o ro" in " ".join(bound)
    as_is = virtiofsd_argv(one, "/run/s.sock", "virtiofsd", "c", "chroot", mounted_read_only=True)
    assert as_is[0] == "virtiofsd" and as_is[-2:] == ["-o", "sandbox=chroot"]
    assert "--readonly" in virtiofsd_argv(one, "/run/s.sock", "virtiofsd", "rust", "chroot", True)
