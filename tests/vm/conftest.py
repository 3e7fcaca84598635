from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTVM = REPO / "scripts" / "testvm"


class VMRunner:
    """Runs scripts/testvm with a private TMPDIR, so its QEMU can be found (and must be gone)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def env(self, **extra: str) -> dict[str, str]:
        # The suite runs two test VMs at once: with few host CPUs, one TCG thread per VM runs
        # a module 1.6-1.8x faster than one per vCPU (see scripts/testvm --tcg-threads).
        threads = {"TESTVM_TCG_THREADS": os.environ.get("TESTVM_TCG_THREADS", "single")}
        return {**os.environ, "TMPDIR": str(self.tmp), **threads, **extra}

    def run(
        self, *args: str, timeout: float = 300, env: dict[str, str] | None = None, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(TESTVM), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env(),
            cwd=REPO,
            **kw,
        )  # type: ignore[call-overload]

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(TESTVM), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd=REPO,
            **kw,
        )  # type: ignore[call-overload]

    def qemus(self) -> list[int]:
        """QEMU processes started by this fixture's testvm calls (their -append names TMPDIR)."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(self.tmp).encode() in cmdline:
                found.append(int(pid))
        return found

    def leftovers(self) -> list[str]:
        return [str(p) for p in self.tmp.iterdir()] + [f"qemu pid {p}" for p in self.qemus()]


@pytest.fixture
def testvm(tmp_path: Path) -> Iterator[VMRunner]:
    vm = VMRunner(tmp_path)
    yield vm
    assert vm.qemus() == [], "a QEMU outlived its testvm"
