"""Firmware boot: UEFI (OVMF) with a variable store per instance, or SeaBIOS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner import argv, spec
from runner.run import preflight
from runner.run.options import Options, StartupError


def load(**fields: Any) -> spec.InstanceSpec:
    doc = {"name": "f", "vcpus": 1, "memory_mib": 64, "disks": [{"path": "/d"}], **fields}
    return spec.load(json.dumps(doc))


def test_uefi_is_ovmf_on_q35_with_the_instances_store() -> None:
    s = load(boot={"disk": 0, "firmware": "uefi"})
    full = argv.qemu_argv(s, "tcg", argv.Wiring(qmp_fd=3, uefi=("/ovmf/CODE.fd", "/run/x/v.fd")))
    assert full[full.index("-machine") + 1] == "q35"
    drives = [full[i + 1] for i, x in enumerate(full) if x == "-drive"]
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/ovmf/CODE.fd" in drives
    assert "if=pflash,format=raw,unit=1,file=/run/x/v.fd" in drives
    bios = argv.qemu_argv(load(boot={"disk": 0}), "tcg", argv.Wiring(qmp_fd=3))
    assert not [a for a in bios if "pflash" in a]


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(spec.SpecError, match="needs firmware uefi"):
        load(boot={"disk": 0, "efi_vars": "/v.fd"})
    s = load(boot={"disk": 0, "firmware": "uefi"})
    o = Options(spec_path="/s", ovmf_code=str(tmp_path / "none.fd"))
    with pytest.raises(StartupError, match="package ovmf"):
        preflight.uefi_firmware(s, o)
    code, tmpl = tmp_path / "c.fd", tmp_path / "v.fd"
    code.write_bytes(b"c")
    tmpl.write_bytes(b"v")
    o = Options(spec_path="/s", ovmf_code=str(code), ovmf_vars=str(tmpl))
    assert preflight.uefi_firmware(s, o) == (str(code), str(tmpl))
    assert preflight.uefi_firmware(load(boot={"disk": 0}), o) is None
