from __future__ import annotations

import json

import pytest

from runner import spec

BASE = {"name": "vm-1", "vcpus": 2, "memory_mib": 256}


def load(**changes: object) -> spec.InstanceSpec:
    return spec.load(json.dumps({**BASE, **changes}))


def test_minimal_spec_gets_defaults() -> None:
    s = load()
    assert (s.accel, s.kernel, s.qemu_binary, s.extra_args) == (
        "auto",
        None,
        "qemu-system-x86_64",
        (),
    )


def test_full_spec() -> None:
    s = load(
        accel="tcg",
        kernel="/k",
        initrd="/i",
        cmdline="console=ttyS0",
        qemu_binary="/usr/bin/qemu-system-x86_64",
        extra_args=["-serial", "stdio"],
    )
    assert s.extra_args == ("-serial", "stdio")
    assert spec.load(spec.to_json(s)) == s


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vcpus": "2"}, "field vcpus: expected int, got str"),
        ({"vcpus": True}, "field vcpus: expected int, got bool"),
        ({"vcpus": 2.0}, "field vcpus: expected int, got float"),
        ({"memory_mib": None}, "field memory_mib: expected int"),
        ({"vcpus": 0}, "vcpus must be at least 1"),
        ({"name": "../x"}, "name '../x' must be"),
        ({"accel": "hvf"}, "field accel: must be one of auto, kvm, tcg, not 'hvf'"),
        ({"extra_args": "-x"}, "field extra_args: expected a list of str"),
        ({"extra_args": [1]}, "field extra_args: item 0: expected str, got int"),
        ({"kernal": "/k"}, "unknown field(s) kernal"),
        ({"initrd": "/i"}, "initrd and cmdline need a kernel"),
        ({"realtime": {"vcpus": "0-x"}}, "realtime vcpus '0-x' must be vCPU indexes"),
        ({"realtime": {"vcpus": ""}}, "realtime vcpus must name at least one vCPU"),
        ({"realtime": {"vcpus": "0", "priority": 0}}, "priority 0 must be between 1 and 99"),
        ({"realtime": {"vcpus": "0", "priority": 100}}, "priority 100 must be between 1 and 99"),
        ({"realtime": {"vcpus": "1-2"}}, "realtime vcpus '1-2': the guest has only vCPUs 0-1"),
        ({"realtime": {"vcpus": 1}}, "field realtime.vcpus: expected str, got int"),
        ({"realtime": {"vcpus": "0", "prio": 1}}, "unknown field(s) prio"),
    ],
)
def test_bad_specs_name_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(spec.SpecError) as e:
        load(**changes)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_fields_are_named() -> None:
    with pytest.raises(spec.SpecError, match="field name: required field missing"):
        spec.load('{"vcpus": 1, "memory_mib": 1}')


@pytest.mark.parametrize("text", ["", "{", "[1]", "null"])
def test_not_an_object(text: str) -> None:
    with pytest.raises(spec.SpecError, match="spec"):
        spec.load(text)


# --- guest plumbing fields ------------------------------------------------------------------

NIC = {"mode": "tap", "ip": "10.0.2.15"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nics": [{**NIC, "ip": "10.0.2.256"}]}, "item 0: ip '10.0.2.256' is not an IPv4"),
        ({"nics": [{**NIC, "ip": "10.0.2.0"}]}, "network or broadcast address"),
        ({"nics": [{**NIC, "mac": "52:54:00:12:34"}]}, "must be a unicast address"),
        ({"nics": [{**NIC, "mac": "03:00:00:00:00:01"}]}, "must be a unicast address"),
        ({"nics": [{**NIC, "gateway": "10.0.3.1"}]}, "must be another host address"),
        ({"nics": [{**NIC, "gateway": "10.0.2.15"}]}, "must be another host address"),
        ({"nics": [{**NIC, "prefix": 31}]}, "prefix 31 must be between 8 and 30"),
        ({"nics": [{**NIC, "dns": ["8.8.8"]}]}, "dns server '8.8.8' is not an IPv4"),
        ({"nics": [{**NIC, "mtu": 100}]}, "mtu 100 must be between"),
        ({"nics": [{**NIC, "tap": "a-name-far-too-long"}]}, "must be 1-15 letters"),
        ({"nics": [{**NIC, "fd": 5}]}, "takes no fd"),
        ({"nics": [{"mode": "tap-fd", "ip": "10.0.2.15"}]}, "takes an inherited fd"),
        ({"nics": [{**NIC, "mode": "bridge"}]}, "must be one of tap, tap-fd"),
        ({"nics": [NIC, {**NIC, "tap": "tap0"}]}, "tap names must be unique"),
        ({"disks": [{}]}, "exactly one of path, fd and image"),
        ({"disks": [{"fd": 2}]}, "is stdin/stdout/stderr"),
        ({"disks": [{"path": "disk.img"}]}, "path must be an absolute path"),
        ({"disks": [{"path": "/d", "cache": "fast"}]}, "must be one of none, writeback"),
        (
            {"disks": [{"fd": 5}], "nics": [{"mode": "tap-fd", "fd": 5, "ip": "10.0.0.2"}]},
            "an inherited fd can serve one disk or nic only",
        ),
        ({"shares": [{"source": "/a", "tag": "x y"}]}, "share tag 'x y' must be"),
        (
            {"shares": [{"source": "/a", "tag": "t"}, {"source": "/b", "tag": "t"}]},
            "share tags must be unique",
        ),
        ({"memory": {"hugepages": "4M"}}, "must be one of none, 2M, 1G"),
        ({"memory": {"prealloc": "yes"}}, "expected bool, got str"),
        ({"boot": {}}, "boot needs a kernel or a disk"),
        ({"boot": {"disk": 0}}, "boot disk 0 is not one of the 0 disks"),
        ({"boot": {"kernel": "/k", "disk": 0}}, "a kernel or a disk, not both"),
        ({"boot": {"kernel": "/k"}, "kernel": "/k"}, "not both"),
        ({"console": {"log_file": "console.log"}}, "log_file must be an absolute path"),
        ({"nics": "tap"}, "field nics: expected a list of Nic"),
    ],
)
def test_bad_plumbing_is_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(spec.SpecError) as e:
        load(**changes)
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_for_nics_are_stable_and_valid() -> None:
    second = {**NIC, "ip": "192.168.7.9", "prefix": 16, "binding": "isolated"}
    s = load(nics=[NIC, second])
    again = load(nics=[NIC, second])
    assert s.nics[0].binding == "masquerade"  # a tap's default, as KubeVirt's
    assert s.mac(0) == again.mac(0) != s.mac(1)
    assert s.mac(0).startswith("52:54:00:")
    assert int(s.mac(0)[:2], 16) & 1 == 0
    assert str(s.nics[0].gateway_address) == "10.0.2.1"
    assert str(s.nics[1].gateway_address) == "192.168.0.1"
    assert (s.tap_name(0), s.tap_name(1)) == ("tap0", "tap1")
    other = spec.load(json.dumps({**BASE, "name": "vm-2", "nics": [NIC]}))
    assert other.mac(0) != s.mac(0)


def test_top_level_kernel_still_works() -> None:
    s = load(kernel="/k", cmdline="quiet")
    assert s.kernel_boot == spec.Boot(kernel="/k", cmdline="quiet")
    assert load().kernel_boot is None


def test_realtime_vcpus_get_their_priority() -> None:
    assert load().realtime_priorities() == {}
    s = load(vcpus=4, realtime={"vcpus": "0,2-3", "priority": 5})
    assert s.realtime_priorities() == {0: 5, 2: 5, 3: 5}
    assert load(realtime={"vcpus": "1"}).realtime_priorities() == {1: 1}
    assert spec.load(spec.to_json(s)) == s
