"""Disks as the runner hands them to real QEMU (its own -drive options, from runner.argv): an
image's overlay per start in the scratch directory, unlinked once open, the base never written;
IO limits as one throttle group for the instance, or a disk's own. QEMU runs paused; writes go
through qemu-io on its monitor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import argv, spec
from runner.run import metrics

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="needs QEMU and qemu-img",
)


class Monitor:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(100):
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.call("qmp_capabilities")

    def call(self, command: str, **arguments: Any) -> Any:
        self.f.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.f.flush()
        while True:
            answer = json.loads(self.f.readline())
            if "error" in answer:
                raise AssertionError(answer["error"])
            if "return" in answer:
                return answer["return"]


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(s: spec.InstanceSpec, scratch: Path) -> tuple[subprocess.Popen[bytes], Monitor]:
        full = argv.qemu_argv(s, "tcg", argv.Wiring(qmp_fd=-1))
        drives = [x for i, x in enumerate(full) if i and full[i - 1] in ("-drive", "-device")]
        opts = [x for d in drives for x in (("-drive" if "if=none" in d else "-device"), d)]
        sock = tmp_path / "qmp.sock"
        proc = subprocess.Popen(
            [
                *("qemu-system-x86_64", "-S", "-display", "none", "-nodefaults"),
                *("-machine", "q35", *opts, "-qmp", f"unix:{sock},server=on,wait=off"),
            ],
            env={**os.environ, "TMPDIR": str(scratch)},
        )
        procs.append(proc)
        return proc, Monitor(sock)

    yield start
    for p in procs:
        p.kill()
        p.wait()


def load(**fields: Any) -> spec.InstanceSpec:
    return spec.load(json.dumps({"name": "d", "vcpus": 1, "memory_mib": 64, **fields}))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_image_is_written_through_an_overlay_that_leaves_nothing(
    tmp_path: Path, qemu: Any
) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    before = digest(base)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc, mon = qemu(load(disks=[{"image": str(base), "format": "qcow2"}]), scratch)
    (block,) = mon.call("query-block")
    assert str(scratch) in block["inserted"]["file"] and not block["inserted"]["ro"]
    mon.call("human-monitor-command", **{"command-line": 'qemu-io disk0 "write 0 1M"'})
    # The overlay is QEMU's alone: unlinked at once, nothing for a killed runner to leave.
    assert os.listdir(scratch) == []
    held = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
    assert any(h.startswith(str(scratch)) and h.endswith("(deleted)") for h in held), held
    assert any(h == str(base) for h in held)
    mon.call("quit")
    proc.wait(timeout=10)
    assert digest(base) == before


def test_io_limits_are_one_group_for_the_instance_or_a_disks_own(tmp_path: Path, qemu: Any) -> None:
    disks = []
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"\0" * (1 << 20))
        disks.append({"path": str(tmp_path / name)})
    disks[2]["io"] = {"read_iops": 50, "write_iops": 20}
    s = load(disks=disks, io={"iops": 200, "bps": 1 << 20, "iops_burst": 400})
    _, mon = qemu(s, tmp_path)
    blocks = {b["device"] or b["qdev"]: b["inserted"] for b in mon.call("query-block")}
    a, b, c = (blocks[k] for k in sorted(blocks))
    assert a["group"] == b["group"] == "instance" and c["group"] == "disk2"
    assert (a["iops"], a["bps"], a["iops_max"]) == (200, 1 << 20, 400)
    assert (c["iops"], c["iops_rd"], c["iops_wr"]) == (0, 50, 20)
    # What /metrics reports per disk, from this QEMU's own answer.
    stats = metrics.parse_blockstats(mon.call("query-blockstats"))
    assert [d.disk for d in stats] == ["disk0", "disk1", "disk2"]
    assert all(d.read_ops == d.write_ops == 0 for d in stats)


OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")


@pytest.mark.skipif(not OVMF.exists(), reason="needs Debian's ovmf")
def test_uefi_boots_with_a_variable_store_of_its_own(tmp_path: Path) -> None:
    """The runner (isolation off) boots a disk through OVMF: the firmware runs (its boot
    manager speaks on the serial console), the store is a per-start copy, and nothing is left."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    doc = {
        "name": "uefi",
        "vcpus": 1,
        "memory_mib": 256,
        "accel": "tcg",
        "boot": {"disk": 0, "firmware": "uefi"},
        "disks": [{"path": str(disk)}],
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(doc))
    run = tmp_path / "run"
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("instance-runner")),
                "run",
                *("--spec", str(path), "--isolation", "off", "--run-dir", str(run)),
                *("--shutdown-timeout", "1"),
            ],
            stdout=f,
            stderr=subprocess.PIPE,
        )
    try:
        deadline = time.monotonic() + 120
        while b"BdsDxe" not in out.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        assert (run / "efi-vars.fd").stat().st_size == Path(
            "/usr/share/OVMF/OVMF_VARS_4M.fd"
        ).stat().st_size
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (run / "efi-vars.fd").exists()
