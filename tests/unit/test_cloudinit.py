"""cloud-init's NoCloud seed: what each file says, and the ISO it goes in (read back with
pycdlib). The guest reading it is tests/e2e/test_plumbing.py."""

from __future__ import annotations

import io
import json
from typing import Any

import pycdlib
import pytest

from runner import cloudinit, spec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl u@h"


def load(**fields: Any) -> spec.InstanceSpec:
    doc = {"name": "vm-1", "vcpus": 1, "memory_mib": 64, "kernel": "/k", **fields}
    return spec.load(json.dumps(doc))


def test_the_instance_id_stays_for_a_name_and_changes_when_asked() -> None:
    a = cloudinit.instance_id(load(cloud_init={}))
    assert a == cloudinit.instance_id(load(cloud_init={"ssh_authorized_keys": [KEY]}))
    assert a != cloudinit.instance_id(load(name="vm-2", cloud_init={}))
    assert cloudinit.instance_id(load(cloud_init={"instance_id": "i-2"})) == "i-2"


def test_meta_data_names_the_host_and_carries_the_keys() -> None:
    meta = cloudinit.meta_data(load(cloud_init={"ssh_authorized_keys": [KEY]}))
    assert meta["local-hostname"] == "vm-1" and meta["public-keys"] == [KEY]


def test_network_config_describes_the_nics_as_served() -> None:
    s = load(
        nics=[
            {"ipv6_prefix": "fd10:0:2::/64", "dns": ["10.96.0.10"], "dns6": ["fd00::a"]},
            {"binding": "passt"},
            {"mode": "tap-fd", "fd": 7},
        ]
    )
    eth = cloudinit.network_config(s)["ethernets"]
    assert eth["nic0"]["match"] == {"macaddress": s.mac(0)}
    assert eth["nic0"]["addresses"] == ["10.0.2.2/24", f"{s.guest6(0)}/64"]
    assert eth["nic0"]["routes"] == [
        {"to": "0.0.0.0/0", "via": "10.0.2.1"},
        {"to": "::/0", "via": "fd10:0:2::1"},
    ]
    assert eth["nic0"]["nameservers"]["addresses"] == ["10.96.0.10", "fd00::a"]
    assert eth["nic1"]["dhcp4"] and eth["nic1"]["dhcp6"]
    assert eth["nic2"]["dhcp4"] and not eth["nic2"]["dhcp6"]


def read_back(image: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for name in ("meta-data", "user-data", "network-config"):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
        return label, files
    finally:
        iso.close()


def test_the_seed_is_a_cidata_volume_with_the_three_files() -> None:
    s = load(nics=[{}], cloud_init={"ssh_authorized_keys": [KEY]})
    files = cloudinit.seed_files(s, b"#cloud-config\npackages: [htop]\n", None)
    label, got = read_back(cloudinit.iso(files))
    assert label == "cidata"
    assert got == files
    assert json.loads(got["meta-data"])["public-keys"] == [KEY]
    assert json.loads(got["network-config"])["version"] == 2
    assert cloudinit.seed_files(s, None, None)["user-data"].startswith(b"#cloud-config")


@pytest.mark.parametrize(
    ("ci", "message"),
    [
        ({"ssh_authorized_keys": ["not a key"]}, "OpenSSH public key"),
        ({"ssh_authorized_keys": [KEY + "\nssh-rsa AAAA x"]}, "OpenSSH public key"),
        ({"instance_id": "a b"}, "instance_id"),
        ({"meta_data": "/m", "instance_id": "i-1"}, "give one"),
        ({"user_data": "relative"}, "absolute path"),
    ],
)
def test_refused(ci: dict[str, object], message: str) -> None:
    with pytest.raises(spec.SpecError, match=message):
        load(cloud_init=ci)
