"""The masquerade binding end to end: a real guest on its tap in a "pod" namespace, joined by
a veth to a "node" namespace, over IPv4 and IPv6. What the guest and the node see of each other
is the proof; the rules are runner.netrules (tests/unit/test_netrules.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import spec

from .netns import Netns, unprivileged

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
        reason="needs root, iproute2 and nftables for network namespaces",
    ),
]
POD4, NODE4, POD6, NODE6 = "192.168.77.2", "192.168.77.1", "fd00:77::2", "fd00:77::1"
PEER4, PEER6 = "192.168.77.3", "fd00:77::3"  # another host on the pod network, not the gateway
METRICS = 9464
RESOLV_CONF = (
    "search default.svc.cluster.local svc.cluster.local cluster.local\n"
    "nameserver 10.96.0.10\n"
    "options ndots:5\n"
)
# Sends one line naming the client's address, then closes: what the guest fetches.
SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen()
while True:
    c, a = s.accept()
    c.sendall(f"{sys.argv[2]} sees {a[0].removeprefix('::ffff:')}\\n".encode())
    c.close()
"""


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    ).stdout


def stopped_clean(netns: Netns, pod_server: subprocess.Popen[bytes]) -> None:
    """SIGTERM ends the runner with 0 and leaves no process, device or nftables table."""
    assert netns.finish() == 0
    pod_server.kill()
    pod_server.wait()
    netns.assert_nothing_left(devices=["lo", "eth0"])
    ruleset = json.loads(sh(netns.name, "nft", "-j", "list", "ruleset"))["nftables"]
    assert [r for r in ruleset if "metainfo" not in r] == [], "nft table left"


def http(ns: str, url: str) -> str:
    """The body (an address as busybox httpd gives it, `[::ffff:a.b.c.d]`, made plain), or the
    error (a connection refused or timed out)."""
    code = (
        "import sys, urllib.request\n"
        "try:\n"
        "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
    )
    body = sh(ns, sys.executable, "-c", code, url).strip()
    return body.replace("[::ffff:", "").replace("[", "").replace("]", "")


@pytest.fixture
def node(netns: Netns) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The node's namespace, joined to the pod's by a veth (the pod's eth0, MTU 1450 as on an
    overlay network), with a server on port 8000; a server in the pod on 7000 that the guest
    must not reach; the pod's resolv.conf as kubelet writes it (`ip netns exec` mounts
    /etc/netns/<name>/resolv.conf there)."""
    name = f"{netns.name}-node"
    subprocess.run(["ip", "netns", "add", name], check=True)
    servers: list[subprocess.Popen[bytes]] = []
    etc = Path("/etc/netns") / netns.name
    etc.mkdir(parents=True)
    (etc / "resolv.conf").write_text(RESOLV_CONF)
    try:
        for cmd in (
            f"ip link add eth0 netns {netns.name} mtu 1450 type veth peer name veth0 netns {name}",
            f"ip -n {name} address add {NODE4}/24 dev veth0",
            f"ip -n {name} address add {NODE6}/64 dev veth0 nodad",
            f"ip -n {name} address add {PEER4}/24 dev veth0",
            f"ip -n {name} address add {PEER6}/64 dev veth0 nodad",
            f"ip -n {name} link set veth0 up",
            f"ip -n {name} link set lo up",
            f"ip -n {netns.name} address add {POD4}/24 dev eth0",
            f"ip -n {netns.name} address add {POD6}/64 dev eth0 nodad",
            f"ip -n {netns.name} link set eth0 up",
            f"ip -n {netns.name} link set lo up",
            f"ip -n {netns.name} route add default via {NODE4}",
            f"ip -n {netns.name} -6 route add default via {NODE6}",
        ):
            subprocess.run(cmd.split(), check=True)
        for ns, port, who in ((name, "8000", "node"), (netns.name, "7000", "pod")):
            argv = ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, port, who]
            servers.append(subprocess.Popen(argv))
        yield name, servers[1]
    finally:
        for server in servers:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", name], check=True)
        shutil.rmtree(etc)
        with contextlib.suppress(OSError):  # ours, unless other namespaces have files there
            etc.parent.rmdir()


def test_the_guest_on_the_pod_network(
    netns: Netns, node: tuple[str, subprocess.Popen[bytes]]
) -> None:
    node_ns, pod_server = node
    cmdline = (
        f"guest.ipv6=1 guest.serve=80 guest.fetch={NODE4}:8000 guest.fetch={NODE6}:8000 "
        "guest.fetch=10.0.2.1:7000"
    )
    nic = {"mode": "tap", "binding": "masquerade", "ipv6_prefix": "fd10:0:2::/64"}
    path = netns.spec(cmdline, nics=[nic])
    guest6 = spec.load(path.read_text()).guest6(0)
    netns.start(path, "--metrics-address", f":{METRICS}")
    netns.wait_console("GUEST-READY")
    console = netns.console()

    assert f"GUEST-IP6 {guest6}" in console  # SLAAC from the runner's Router Advertisements
    # The pod's MTU, DNS and search domains, and the instance's name.
    search = "default.svc.cluster.local svc.cluster.local cluster.local"
    assert f"GUEST-LEASE mtu=1450 dns=10.96.0.10 search={search} hostname=e2e" in console
    # Out: seen as the pod, on both families; nothing of the pod itself.
    assert f"GUEST-FETCHED {NODE4}:8000 node sees {POD4}" in console
    assert f"GUEST-FETCHED {NODE6}:8000 node sees {POD6}" in console, console
    fetched = [line.split("] ", 1)[-1] for line in console.splitlines() if "GUEST-FETCHED" in line]
    # The pod itself is closed to its guest: the server there never answers.
    assert [f for f in fetched if f.startswith("GUEST-FETCHED 10.0.2.1:7000")]
    assert not [f for f in fetched if "pod sees" in f]
    # In: the pod's address reaches the guest, which sees the real client.
    assert http(node_ns, f"http://{POD4}/cgi-bin/who") == f"guest sees {NODE4}"
    assert http(node_ns, f"http://[{POD6}]/cgi-bin/who") in (  # either of the node's
        f"guest sees {NODE6}",
        f"guest sees {PEER6}",
    )
    # The runner's own port stays the runner's, from outside and from inside the pod.
    assert http(node_ns, f"http://{POD4}:{METRICS}/healthz") == "ok"
    assert http(netns.name, f"http://127.0.0.1:{METRICS}/healthz") == "ok"
    # The pod's loopback reaches the guest (seen as the gateway: it must answer somewhere).
    assert http(netns.name, "http://127.0.0.1/cgi-bin/who") == "guest sees 10.0.2.1"
    assert sh(netns.name, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"

    stopped_clean(netns, pod_server)
    assert sh(netns.name, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"
    assert sh(netns.name, "sysctl", "-n", "net.ipv6.conf.all.forwarding").strip() == "0"


def test_passt_gives_the_guest_the_pods_own_address(
    netns: Netns, node: tuple[str, subprocess.Popen[bytes]], vm_pod_capabilities: list[str]
) -> None:
    """No tap and no nftables: passt, a user-mode stack, has the guest appear with the pod's
    addresses, and binds the listed ports in the pod for it. The runner runs as an
    unprivileged VM pod without NET_ADMIN and NET_RAW: a pod whose nics are all passt needs
    neither (KILL, NET_BIND_SERVICE, SETUID and SETGID it does: passt binds the pod's ports,
    then drops to nobody, where only KILL lets the runner stop it)."""
    node_ns, pod_server = node
    caps = [c for c in vm_pod_capabilities if c not in ("net_admin", "net_raw")]
    assert len(caps) == len(vm_pod_capabilities) - 2
    cmdline = f"guest.ipv6=1 guest.serve=80 guest.fetch={PEER4}:8000 guest.fetch={PEER6}:8000"
    nic = {"binding": "passt", "ports": [{"port": 80}]}
    netns.start(
        netns.spec(cmdline, nics=[nic]),
        "--metrics-address",
        f":{METRICS}",
        prefix=unprivileged(caps),
    )
    ready = netns.wait_console("GUEST-READY")
    console = netns.console()

    assert f"GUEST-READY ip={POD4} gw={NODE4}" in ready  # the pod's own address and gateway
    assert f"GUEST-IP6 {POD6}" in console or "GUEST-IP6 fd00:77::" in console
    assert f"GUEST-FETCHED {PEER4}:8000 node sees {POD4}" in console
    assert f"GUEST-FETCHED {PEER6}:8000 node sees {POD6}" in console
    assert http(node_ns, f"http://{POD4}/cgi-bin/who") == f"guest sees {NODE4}"
    assert http(node_ns, f"http://{POD4}:{METRICS}/healthz") == "ok"
    assert "nic" not in sh(netns.name, "ip", "-o", "link")  # no tap made
    ruleset = json.loads(sh(netns.name, "nft", "-j", "list", "ruleset"))["nftables"]
    assert [r for r in ruleset if "metainfo" not in r] == []

    stopped_clean(netns, pod_server)


# Sends 2 MiB to whoever connects on one port and reads 2 MiB from whoever connects on the
# next, then closes, printing how long the second MiB took (nftables' limit starts with a
# second's worth of tokens beyond the burst: the first MiB is partly free).
BULK = """
import socket, sys, threading, time
def serve(port, send):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen()
    while True:
        c, _ = s.accept()
        if send:
            c.sendall(bytes(2 << 20))
        else:
            got, half = 0, 0.0
            while got < 2 << 20 and (chunk := c.recv(65536)):
                got += len(chunk)
                if not half and got >= 1 << 20:
                    half = time.monotonic()
            print("SINK", got, time.monotonic() - half, flush=True)
        c.close()
threading.Thread(target=serve, args=(int(sys.argv[1]) + 1, False)).start()
serve(int(sys.argv[1]), True)
"""
MBIT = 4


def test_bandwidth_towards_and_from_the_guest(
    netns: Netns, node: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """4 Mbit/s each way: shaped towards the guest (htb on the tap), policed from it
    (nftables' limit at the tap's ingress). Unlimited, this guest moves 2 MiB in well under a
    second each way (see the note in the README)."""
    node_ns, pod_server = node
    bulk = subprocess.Popen(
        ["ip", "netns", "exec", node_ns, sys.executable, "-c", BULK, "8001"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        nic = {
            "binding": "masquerade",
            "bandwidth": {"ingress_mbit": MBIT, "egress_mbit": MBIT, "burst_kb": 32},
        }
        netns.start(netns.spec(f"guest.pull={NODE4}:8001 guest.push={NODE4}:8002", nics=[nic]))
        netns.wait_console("GUEST-READY", timeout=120)
        console = netns.console()
        shaped = sh(netns.name, "tc", "class", "show", "dev", "tap0")
        policed = sh(netns.name, "nft", "list", "table", "netdev", "instance_runner")
    finally:
        bulk.kill()
        sink = bulk.communicate()[0]
    (pulled,) = [
        line.split("GUEST-PULLED")[1].split()
        for line in console.splitlines()
        if "GUEST-PULLED" in line
    ]
    (pushed,) = [line.split()[1:] for line in sink.splitlines() if line.startswith("SINK")]
    assert pulled[0] == pushed[0] == str(2 << 20)
    towards = (2 << 20) * 8 / (int(pulled[1]) / 100) / 1e6  # timed by the guest
    away = (1 << 20) * 8 / float(pushed[1]) / 1e6  # the second MiB, timed by the node
    print(f"bandwidth: towards the guest {towards:.2f} Mbit/s, from it {away:.2f} Mbit/s")
    assert f"rate {MBIT}Mbit" in shaped
    assert "limit rate over 500 kbytes/second burst 32 kbytes drop" in policed
    # Within the limit (headers count against it, so a little under), and near it.
    assert 0.3 * MBIT < towards < 1.1 * MBIT
    assert 0.2 * MBIT < away < 1.1 * MBIT

    stopped_clean(netns, pod_server)


@pytest.mark.parametrize("step", ["network", "plumbing", "qemu"])
def test_sigterm_around_the_network_step_leaves_nothing(netns: Netns, step: str) -> None:
    """Stopped before the network is made, or after it (before its taps are opened, or with
    QEMU about to start): no tap, no table, every sysctl as it was, no process."""
    forward = sh(netns.name, "sysctl", "-n", "net.ipv4.ip_forward").strip()
    nic = {
        "binding": "masquerade",
        "ipv6_prefix": "fd10:0:2::/64",
        "bandwidth": {"ingress_mbit": 10, "egress_mbit": 10},
    }
    netns.start(netns.spec(nics=[nic]), "--pause-before", step)
    paused = netns.tmp / "run" / "paused"
    deadline = time.monotonic() + 30
    while not paused.exists():
        assert time.monotonic() < deadline and netns.proc is not None
        assert netns.proc.poll() is None, netns.err.read_text()
        time.sleep(0.05)
    tables = sh(netns.name, "nft", "list", "tables").split()
    made = step != "network"
    assert ("netdev" in tables) == ("inet" in tables) == made
    assert ("tap0" in netns.devices()) == made
    assert netns.finish() == 128 + signal.SIGTERM
    netns.assert_nothing_left()
    assert sh(netns.name, "nft", "list", "tables").strip() == ""
    assert sh(netns.name, "sysctl", "-n", "net.ipv4.ip_forward").strip() == forward
    assert sh(netns.name, "sysctl", "-n", "net.ipv6.conf.all.forwarding").strip() == "0"
