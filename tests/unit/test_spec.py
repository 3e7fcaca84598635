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
        ({"extra_args": "-x"}, "field extra_args: expected a list of strings"),
        ({"extra_args": [1]}, "field extra_args: expected a list of strings"),
        ({"kernal": "/k"}, "unknown field(s) kernal"),
        ({"initrd": "/i"}, "initrd and cmdline need a kernel"),
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
