"""A network plan made and unmade in a network namespace of its own, as the controller makes
it for a pod (from a thread that enters the namespace): what the kernel then holds is the proof.
No guest: the guest's side is tests/e2e/test_masquerade.py and, through the controller,
tests/vm/inside/test_guest_smoke.py."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import netplan, netrules, plumbing, podnet

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
        reason="needs root, iproute2 and nftables for network namespaces",
    ),
]


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def ns() -> Iterator[tuple[str, int]]:
    name = f"podnet-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        yield name, fd
    finally:
        os.close(fd)
        subprocess.run(["ip", "netns", "del", name], check=True)


FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


def apply(doc: netrules.Json) -> None:
    podnet.nft_now("nft", doc)


def plan(*names: str, **tap: object) -> netplan.NetworkPlan:
    return netplan.NetworkPlan(
        taps=tuple(netplan.TapPlan(name=n, gateway4="10.0.2.1/24", **tap) for n in names)  # type: ignore[arg-type]
    )


def links(name: str) -> dict[str, dict]:
    return {x["ifname"]: x for x in json.loads(sh(name, "ip", "-j", "-d", "address"))}


def test_made_in_the_namespace_and_unmade_whole(ns: tuple[str, int]) -> None:
    name, fd = ns
    full = netplan.NetworkPlan(
        taps=(
            netplan.TapPlan(
                name="tap0",
                gateway4="10.0.2.1/24",
                gateway6="fd10:0:2::1/64",
                mtu=1400,
                ingress_mbit=5,
            ),
        ),
        masquerade=netrules.Masquerade(
            tap="tap0",
            guest4=ipaddress.IPv4Address("10.0.2.2"),
            gateway4=ipaddress.IPv4Address("10.0.2.1"),
            guest6=ipaddress.IPv6Address("fd10:0:2::2"),
        ),
        egress=(netrules.Limit(tap="tap0", mbit=3, burst_kb=64),),
    )
    host_forwarding = FORWARDING.read_text()
    before = podnet.in_netns(fd, lambda: podnet.make(full, 4242, apply))
    assert before == {
        "net/ipv4/ip_forward": "0",
        "net/ipv4/conf/tap0/route_localnet": "0",
        "net/ipv6/conf/all/forwarding": "0",
    }
    tap = links(name)["tap0"]
    assert tap["mtu"] == 1400 and tap["linkinfo"]["info_kind"] == "tun"
    assert tap["linkinfo"]["info_data"]["user"] == 4242 and tap["linkinfo"]["info_data"]["persist"]
    assert {(a["local"], a["prefixlen"]) for a in tap["addr_info"]} >= {
        ("10.0.2.1", 24),
        ("fd10:0:2::1", 64),
    }
    assert "rate 5Mbit" in sh(name, "tc", "class", "show", "dev", "tap0")
    tables = {(t["table"]["family"], t["table"]["name"]) for t in nft_tables(name)}
    assert tables == {("inet", netrules.TABLE), ("netdev", netrules.TABLE)}
    assert sh(name, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
    # Not one of it in the namespace of the thread that asked.
    assert FORWARDING.read_text() == host_forwarding
    assert (
        "tap0" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    )

    podnet.in_netns(fd, lambda: podnet.unmake(full, before, apply))
    assert set(links(name)) == {"lo"}
    assert nft_tables(name) == []
    assert sh(name, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"


def nft_tables(name: str) -> list[dict]:
    ruleset = json.loads(sh(name, "nft", "-j", "list", "ruleset"))["nftables"]
    return [r for r in ruleset if "table" in r]


def test_a_killed_runners_tap_is_replaced_and_no_other_device_taken(ns: tuple[str, int]) -> None:
    name, fd = ns
    podnet.in_netns(fd, lambda: podnet.make(plan("tap0"), 0, apply))
    # Made again (a restarted container): the old tap goes, a new one comes.
    old = links(name)["tap0"]["ifindex"]
    podnet.in_netns(fd, lambda: podnet.make(plan("tap0"), 0, apply))
    assert links(name)["tap0"]["ifindex"] != old
    # One that an instance holds open is never taken (two runners in one namespace).
    held = podnet.in_netns(fd, lambda: podnet.attach_tap("tap0"))
    try:
        with pytest.raises(plumbing.PlumbingError, match="in use or another"):
            podnet.in_netns(fd, lambda: podnet.make(plan("tap1", "tap0"), 0, apply))
        # The refusal took back its own tap alone.
        assert "tap0" in links(name) and "tap1" not in links(name)
    finally:
        os.close(held)
    # A tap another user owns is not taken either.
    podnet.in_netns(fd, lambda: podnet.make(plan("tap2"), 1000, apply))
    with pytest.raises(plumbing.PlumbingError, match="another's"):
        podnet.in_netns(fd, lambda: podnet.make(plan("tap2"), 0, apply))
    sh(name, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    with pytest.raises(plumbing.PlumbingError, match="exists and is no tap"):
        podnet.in_netns(fd, lambda: podnet.make(plan("eth0"), 0, apply))
    podnet.in_netns(fd, lambda: podnet.unmake(plan("tap0", "tap2", "eth0"), {}, apply))
    assert set(links(name)) == {"lo", "eth0", "eth1"}  # never another device of the name


def test_taps_cannot_pile_up_under_new_names(ns: tuple[str, int]) -> None:
    name, fd = ns
    for i in range(netplan.MAX_TAPS):
        podnet.in_netns(fd, lambda i=i: podnet.make(plan(f"t{i}"), 0, apply))
    with pytest.raises(plumbing.PlumbingError, match=f"at most {netplan.MAX_TAPS}"):
        podnet.in_netns(fd, lambda: podnet.make(plan("one-more"), 0, apply))
    assert len(links(name)) == netplan.MAX_TAPS + 1


def test_half_made_is_unmade(ns: tuple[str, int]) -> None:
    name, fd = ns
    broken = netplan.NetworkPlan(
        taps=(netplan.TapPlan(name="tap0", gateway4="10.0.2.1/24"),),
        egress=(netrules.Limit(tap="tap0", mbit=3, burst_kb=64),),
    )

    def failing(doc: netrules.Json) -> None:
        if any("chain" in c.get("add", {}) for c in doc["nftables"]):
            raise plumbing.PlumbingError("nft failed")
        apply(doc)

    with pytest.raises(plumbing.PlumbingError, match="nft failed"):
        podnet.in_netns(fd, lambda: podnet.make(broken, 0, failing))
    assert set(links(name)) == {"lo"}
