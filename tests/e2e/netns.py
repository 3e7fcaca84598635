"""A network namespace that stands for a pod, with the runner in it (--isolation off: cgroups
are proven in the test VM), and what the tests read of it."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_names = itertools.count()


class Netns:
    def __init__(self, name: str, tmp: Path, image: Path) -> None:
        self.name, self.tmp, self.image = name, tmp, image
        self.share = tmp / "share"
        self.share.mkdir()
        (self.share / "hello.txt").write_text("hello from the host\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started: list[int] = []

    def spec(self, cmdline_extra: str = "", **fields: object) -> Path:
        doc: dict[str, object] = {
            "name": "e2e",
            "vcpus": 1,
            "memory_mib": 256,
            "accel": "tcg",
            "boot": {
                "kernel": str(self.image / "vmlinuz"),
                "initrd": str(self.image / "initrd.gz"),
                "cmdline": "console=ttyS0 quiet panic=-1 guest.share=data "
                "guest.read=hello.txt " + cmdline_extra,
            },
            "nics": [{"mode": "tap", "binding": "isolated", "ip": "10.0.2.15", "prefix": 24}],
            "shares": [{"source": str(self.share), "tag": "data"}],
        }
        doc.update(fields)
        path = self.tmp / "spec.json"
        path.write_text(json.dumps(doc))
        return path

    def start(
        self, spec: Path, *args: str, prefix: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        self.out = self.tmp / "stdout"
        self.err = self.tmp / "stderr"
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.name,
                *prefix,
                sys.executable,
                "-m",
                "runner.cli",
                "run",
                "--isolation",
                "off",
                "--spec",
                str(spec),
                "--run-dir",
                str(self.tmp / "run"),
                "--shutdown-timeout",
                "10",
                *args,
            ],
            stdout=open(self.out, "wb"),  # noqa: SIM115 - the child owns them
            stderr=open(self.err, "wb"),  # noqa: SIM115
        )
        return self.proc

    def console(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def logs(self) -> list[dict]:
        return [
            json.loads(line) for line in self.err.read_text().splitlines() if line.startswith("{")
        ]

    def wait_console(self, marker: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            for line in self.console().splitlines():
                if marker in line:
                    self.started = self.descendants()
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"no {marker!r} on the console:\n{self.console()}\n{self.err.read_text()[-3000:]}"
        )

    def finish(self, sig: int | None = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if sig is not None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def descendants(self) -> list[int]:
        """Everything the runner started (virtiofsd sandboxes itself into its own netns)."""
        assert self.proc is not None
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found += [int(k) for k in kids]
            todo += [int(k) for k in kids]
        return found

    def process(self, comm: str) -> int:
        for pid in self.descendants():
            with_comm = Path(f"/proc/{pid}/comm")
            if with_comm.exists() and with_comm.read_text().strip().startswith(comm):
                return pid
        raise AssertionError(f"no {comm} in {self.name}")

    def devices(self) -> list[str]:
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, "ip", "-o", "link"],
            capture_output=True,
            text=True,
            check=True,
        )
        return [line.split(":")[1].strip() for line in out.stdout.splitlines()]

    def assert_nothing_left(self, devices: list[str] | None = None) -> None:
        assert self.pids() == [], "processes left in the namespace"
        alive = [p for p in self.started if Path(f"/proc/{p}").exists()]
        assert alive == [], f"children of the runner left: {alive}"
        names = [d.split("@")[0] for d in self.devices()]
        assert names == (devices or ["lo"]), "network devices left behind"
        assert not (self.tmp / "run" / "ready").exists()
        assert not list((self.tmp / "run").glob("*.sock")) if (self.tmp / "run").exists() else True


@contextlib.contextmanager
def new_netns(tmp: Path, image: Path) -> Iterator[Netns]:
    name = f"ir-e2e-{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    tmp.mkdir(exist_ok=True)
    ns = Netns(name, tmp, image)
    try:
        yield ns
    finally:
        if ns.proc is not None and ns.proc.poll() is None:
            ns.proc.kill()
            ns.proc.wait()
        for pid in [*ns.pids(), *ns.descendants()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=True)


def unprivileged(capabilities: list[str]) -> tuple[str, ...]:
    """Run as an unprivileged VM pod: only these capabilities (the example pod's), and no way
    to gain more (no_new_privs)."""
    return (
        "setpriv",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all," + ",".join("+" + c for c in capabilities),
        "--",
    )
