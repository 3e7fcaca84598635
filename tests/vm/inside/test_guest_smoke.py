"""One full nested run: a real Linux guest in an unprivileged VM pod in controller mode, on its
pod's network, inside the test VM (TCG in TCG: the guest alone needs a minute or two to boot).

The pod has its own network namespace, joined to the node's by a veth as a CNI plugin makes it,
a read-only /proc/sys, and neither SYS_ADMIN nor SYS_NICE (NET_ADMIN it has, for dnsmasq): the
controller makes its tap, forwarding and masquerade rules in that namespace, and places its
vCPUs. DHCP, the guest reaching the node as
the pod and reached on the pod's address, the share, pinning, a clean power-off, and nothing of
it left in either namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, Node
from .pods import (
    INSTANCES,
    UNPRIVILEGED_POD,
    Daemon,
    assert_nothing_left,
    capabilities,
    comm,
    start_runner,
)

CAP_SYS_ADMIN = 21
POD4, NODE4 = "192.168.77.2", "192.168.77.1"
# Sends one line naming the client's address, then closes: what the guest fetches.
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8000))
s.listen()
while True:
    c, a = s.accept()
    c.sendall(f"node sees {a[0]}\\n".encode())
    c.close()
"""


def ip(*argv: str, ns: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def pod_net() -> Iterator[str]:
    """A pod's network namespace as a CNI plugin leaves it: eth0 with the pod's address and a
    default route through the node's end of a veth; a server on the node's end."""
    name = f"pod-{os.getpid()}"
    ip("ip", "netns", "add", name)
    try:
        ip("ip", "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("ip", "address", "add", f"{NODE4}/24", "dev", "veth-pod")
        ip("ip", "link", "set", "veth-pod", "up")
        ip("ip", "address", "add", f"{POD4}/24", "dev", "eth0", ns=name)
        ip("ip", "link", "set", "eth0", "up", ns=name)
        ip("ip", "link", "set", "lo", "up", ns=name)
        ip("ip", "route", "add", "default", "via", NODE4, ns=name)
        server = subprocess.Popen([sys.executable, "-c", SERVER, NODE4])
        try:
            yield name
        finally:
            server.kill()
            server.wait()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        subprocess.run(["ip", "link", "del", "veth-pod"], check=False, capture_output=True)


def mount_options(pid: int, where: str) -> list[str]:
    """The options of the last mount on `where` that `pid` sees."""
    seen: list[str] = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == where:
            seen = fields[5].split(",")
    return seen


def tables(ns: str | None) -> list[dict]:
    ruleset = json.loads(ip("nft", "-j", "list", "ruleset", ns=ns))["nftables"]
    return [r for r in ruleset if "table" in r]


NO_CX16 = """#!/bin/sh
for arg; do shift; [ "$arg" = max ] && arg=max,-cx16; set -- "$@" "$arg"; done
exec qemu-system-x86_64 "$@"
"""


def test_real_guest_of_an_unprivileged_pod_on_its_pod_network(
    node: Node, tmp_path: Path, daemon: Daemon, pod_net: str
) -> None:
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
                    f"guest.read=hello.txt guest.write=ip.txt guest.timeout=1200 "
                    f"guest.serve=80 guest.fetch={NODE4}:8000",
                },
                "nics": [{"mode": "tap", "binding": "masquerade", "ports": [{"port": 80}]}],
                "shares": [{"source": str(share), "tag": "data"}],
            }
        )
    )
    out = tmp_path / "console"
    run_dir = Path(f"/run/smoke-{os.getpid()}")  # short: it holds Unix sockets
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    rp = start_runner(
        node,
        tmp_path,
        "1-2",
        "--shutdown-timeout",
        "60",
        "--controller-socket",
        str(daemon.socket),
        spec=spec,
        run_dir=run_dir,
        prefix=("sh", "-c", f'exec "$@" > {out}', "sh"),
        podsim=(
            *UNPRIVILEGED_POD,
            *("--cap-add", "NET_ADMIN", "--grace", "120", "--netns", f"/run/netns/{pod_net}"),
        ),
    )
    ready = rp.wait_ready(timeout=300)
    assert {v["cpu"] for v in ready["vcpus"]} == {1, 2}
    runner = rp.runner_pid()
    assert not capabilities(runner) & (1 << CAP_SYS_ADMIN)
    # The pod could not have set forwarding itself: its /proc/sys is read-only.
    assert "ro" in mount_options(runner, "/proc/sys")
    # The controller made the pod's network, in the pod's namespace only.
    assert {t["table"]["name"] for t in tables(pod_net)} == {"instance_runner"}
    assert ip("cat", "/proc/sys/net/ipv4/ip_forward", ns=pod_net).strip() == "1"
    assert tables(None) == [] and Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding

    # TCG inside TCG beside another test VM on two cores: the guest kernel alone has been
    # seen to need 10 minutes (soft-lockup warnings, ACPI loop timeouts, then on).
    deadline = time.monotonic() + 1200
    while "GUEST-READY" not in (text := out.read_text() if out.exists() else ""):
        assert "GUEST-ERROR" not in text, text
        assert time.monotonic() < deadline, f"the guest did not come up:\n{text}"
        assert rp.pod.proc.poll() is None, rp.pod.proc.communicate()[1]
        time.sleep(1)
    line = next(x for x in text.splitlines() if "GUEST-READY" in x)
    assert line == "[smoke] GUEST-READY ip=10.0.2.2 gw=10.0.2.1 ping=ok read=hello from the test VM"
    assert (share / "ip.txt").read_text() == "10.0.2.2\n"
    # Out: the node sees the pod. In: the pod's address on the forwarded port is the guest's,
    # which sees the node's real address.
    assert f"GUEST-FETCHED {NODE4}:8000 node sees {POD4}" in text, text
    who = urllib.request.urlopen(f"http://{POD4}/cgi-bin/who", timeout=30).read().decode()
    assert NODE4 in who, who

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
    # Nothing of it left in the pod's namespace: no tap, no table, forwarding as it was.
    links = {
        line.split()[0].split("@")[0] for line in ip("ip", "-br", "link", ns=pod_net).splitlines()
    }
    assert links == {"lo", "eth0"}
    assert tables(pod_net) == []
    assert ip("cat", "/proc/sys/net/ipv4/ip_forward", ns=pod_net).strip() == "0"
