"""One full nested run: a real Linux guest under isolation, inside the test VM (TCG in TCG:
the guest alone needs a minute or two to boot). DHCP, the share, pinning, clean power-off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import REPO, Node
from .pods import INSTANCES, assert_nothing_left, comm, start_runner

NO_CX16 = """#!/bin/sh
for arg; do shift; [ "$arg" = max ] && arg=max,-cx16; set -- "$@" "$arg"; done
exec qemu-system-x86_64 "$@"
"""


def test_real_guest_isolated_end_to_end(node: Node, tmp_path: Path) -> None:
    image = Path(
        subprocess.run(
            [sys.executable, str(REPO / "images/guest/build.py")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the test VM\n")
    # TCG inside the test VM's TCG runs a guest's cmpxchg16b wrongly now and then (Linux 6.12
    # double-faults in its first allocations): this guest is told its CPU has none.
    qemu = tmp_path / "qemu"
    qemu.write_text(NO_CX16)
    qemu.chmod(0o755)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "name": "smoke",
                "vcpus": 2,
                "memory_mib": 256,
                "accel": "tcg",
                "qemu_binary": str(qemu),
                "boot": {
                    "kernel": str(image / "vmlinuz"),
                    "initrd": str(image / "initrd.gz"),
                    "cmdline": "console=ttyS0 quiet panic=-1 guest.share=data "
                    "guest.read=hello.txt guest.write=ip.txt guest.timeout=1200",
                },
                "nics": [{"mode": "tap", "ip": "10.0.2.15"}],
                "shares": [{"source": str(share), "tag": "data"}],
            }
        )
    )
    out = tmp_path / "console"
    run_dir = Path(f"/run/smoke-{os.getpid()}")  # short: it holds Unix sockets
    rp = start_runner(
        node,
        tmp_path,
        "1-2",
        "--shutdown-timeout",
        "60",
        spec=spec,
        run_dir=run_dir,
        prefix=("sh", "-c", f'exec "$@" > {out}', "sh"),
        podsim=("--grace", "120"),
    )
    ready = rp.wait_ready(timeout=300)
    assert {v["cpu"] for v in ready["vcpus"]} == {1, 2}

    # TCG inside TCG beside another test VM on two cores: the guest kernel alone has been
    # seen to need 10 minutes (soft-lockup warnings, ACPI loop timeouts, then on).
    deadline = time.monotonic() + 1200
    while "GUEST-READY" not in (text := out.read_text() if out.exists() else ""):
        assert "GUEST-ERROR" not in text, text
        assert time.monotonic() < deadline, f"the guest did not come up:\n{text}"
        assert rp.pod.proc.poll() is None, rp.pod.proc.communicate()[1]
        time.sleep(1)
    line = next(x for x in text.splitlines() if "GUEST-READY" in x)
    assert (
        line == "[smoke] GUEST-READY ip=10.0.2.15 gw=10.0.2.1 ping=ok read=hello from the test VM"
    )
    assert (share / "ip.txt").read_text() == "10.0.2.15\n"

    # Pinned while the guest runs: exactly the two vCPU threads in the instance cgroup, each
    # allowed one CPU of its own, and no other QEMU thread on CPUs 1-2.
    instance = INSTANCES / f"instance-{rp.pod.uid}"
    tids = [int(t) for t in (instance / "cgroup.threads").read_text().split()]
    assert len(tids) == 2
    assert sorted(tuple(os.sched_getaffinity(t)) for t in tids) == [(1,), (2,)]
    qemu = next(
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and comm(int(p)).startswith("qemu-system")
    )
    others = [int(t) for t in os.listdir(f"/proc/{qemu}/task") if int(t) not in tids]
    assert others and all(not os.sched_getaffinity(t) & {1, 2} for t in others)

    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish(timeout=120)
    assert code == 0, err[-3000:]
    assert "[smoke] GUEST-POWEROFF" in out.read_text()
    assert '"how": "guest power-off"' in err
    assert_nothing_left(rp.pod.uid)
