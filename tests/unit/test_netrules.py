"""The masquerade binding's pure parts: its nftables rules, the guest's IPv6 address, the spec's
refusals and dnsmasq's IPv6 options. The rules are applied to a real kernel in
tests/e2e/test_masquerade.py."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from runner import argv, netplan, netrules, spec
from runner.netrules import Masquerade, Port

G4, GW4 = ipaddress.IPv4Address("10.0.2.2"), ipaddress.IPv4Address("10.0.2.1")
G6 = ipaddress.IPv6Address("fd10:0:2::5054:ff:fe12:3456")


def rules_of(doc: dict[str, Any], chain: str) -> list[list[dict[str, Any]]]:
    return [
        c["add"]["rule"]["expr"]
        for c in doc["nftables"]
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def dnats(doc: dict[str, Any], chain: str) -> list[tuple[str, str, object]]:
    """(family, address, what it matches on) of each DNAT rule."""
    out = []
    for expr in rules_of(doc, chain):
        for e in expr:
            if "dnat" in e:
                out.append((e["dnat"]["family"], e["dnat"]["addr"], expr[-2]["match"]["right"]))
    return out


def test_every_port_by_default_but_the_runners_own() -> None:
    nic = Masquerade(tap="tap0", guest4=G4, gateway4=GW4, guest6=G6, reserved=(Port(port=9464),))
    doc = netrules.ruleset(nic)
    pre = rules_of(doc, "prerouting")
    assert pre[0] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "tap0"}},
        {"return": None},
    ]
    dport = {"payload": {"protocol": "tcp", "field": "dport"}}
    assert pre[1] == [{"match": {"op": "==", "left": dport, "right": 9464}}, {"return": None}]
    every = {"set": ["tcp", "udp", "sctp"]}
    assert dnats(doc, "prerouting") == [("ip", "10.0.2.2", every), ("ip6", str(G6), every)]
    # the pod's loopback: IPv4 only, the runner's port excepted there too
    assert dnats(doc, "output") == [("ip", "10.0.2.2", every)]
    assert any({"return": None} in r for r in rules_of(doc, "output"))


def test_listed_ports_only() -> None:
    ports = (Port(port=22), Port(port=80), Port(port=53, protocol="udp"))
    nic = Masquerade(tap="t", guest4=G4, gateway4=GW4, ports=ports)
    assert dnats(netrules.ruleset(nic), "prerouting") == [
        ("ip", "10.0.2.2", {"set": [22, 80]}),
        ("ip", "10.0.2.2", 53),
    ]


def test_outgoing_masqueraded_and_loopback_snat_to_the_gateway() -> None:
    doc = netrules.ruleset(Masquerade(tap="tap0", guest4=G4, gateway4=GW4, guest6=G6))
    post = json.dumps(rules_of(doc, "postrouting"))
    assert post.count('"masquerade"') == 2 and str(G6) in post
    assert '"snat": {"family": "ip", "addr": "10.0.2.1"}' in post


def test_the_guest_reaches_only_dhcp_ra_and_ping_in_its_pod() -> None:
    doc = netrules.ruleset(Masquerade(tap="tap0", guest4=G4, gateway4=GW4))
    rules = rules_of(doc, "input")
    assert all(r[0]["match"]["right"] == "tap0" for r in rules)
    assert rules[-1][-1] == {"drop": None}  # last: everything else from the guest
    assert [r[-1] for r in rules[:-1]] == [{"accept": None}] * 4


def test_the_table_is_replaced_whole_and_removal_never_fails() -> None:
    doc = netrules.ruleset(Masquerade(tap="tap0", guest4=G4, gateway4=GW4))
    table = {"family": "inet", "name": netrules.TABLE}
    add, delete = {"add": {"table": table}}, {"delete": {"table": table}}
    assert doc["nftables"][:3] == [add, delete, add]
    assert netrules.removal() == {"nftables": [add, delete]}


def test_eui64() -> None:
    net = ipaddress.IPv6Network("fd10:0:2::/64")
    assert netrules.eui64(net, "52:54:00:12:34:56") == G6
    assert netrules.eui64(net, "02:00:00:00:00:01") == ipaddress.IPv6Address("fd10:0:2::ff:fe00:1")
    with pytest.raises(ValueError, match="/64"):
        netrules.eui64(ipaddress.IPv6Network("fd10::/120"), "52:54:00:12:34:56")


def load(**nic: object) -> spec.InstanceSpec:
    doc = {
        "name": "x",
        "vcpus": 1,
        "memory_mib": 64,
        "kernel": "/k",
        "nics": [{"mode": "tap", **nic}],
    }
    return spec.load(json.dumps(doc))


@pytest.mark.parametrize(
    ("nic", "message"),
    [
        ({"binding": "isolated", "ports": [{"port": 22}]}, "masquerade or passt binding only"),
        ({"binding": "masquerade", "ports": [{"port": 0}]}, "between 1 and 65535"),
        ({"binding": "masquerade", "ports": [{"port": 22}, {"port": 22}]}, "unique"),
        ({"binding": "masquerade", "ports": [{"port": 22, "protocol": "icmp"}]}, "protocol"),
        ({"ipv6_prefix": "fd10::/120"}, "unicast /64"),
        ({"ipv6_prefix": "10.0.0.0/8"}, "not an IPv6 network"),
        ({"binding": "nat"}, "binding"),
    ],
)
def test_refused(nic: dict[str, object], message: str) -> None:
    with pytest.raises(spec.SpecError, match=message):
        load(**nic)


def test_one_masquerade_nic() -> None:
    doc = {
        "name": "x",
        "vcpus": 1,
        "memory_mib": 64,
        "kernel": "/k",
        "nics": [{"mode": "tap", "binding": "masquerade"}] * 2,
    }
    doc["nics"] = [{**n, "tap": f"t{i}"} for i, n in enumerate(doc["nics"])]  # type: ignore[attr-defined]
    with pytest.raises(spec.SpecError, match="one nic at most"):
        spec.load(json.dumps(doc))


def test_dnsmasq_advertises_the_prefix_and_leases_the_slaac_address() -> None:
    s = load(binding="masquerade", mac="52:54:00:12:34:56", ipv6_prefix="fd10:0:2::/64")
    assert s.nics[0].ip == "10.0.2.2" and str(s.nics[0].gateway_address) == "10.0.2.1"
    assert s.guest6(0) == G6
    args = argv.dnsmasq_argv(s, 0)
    assert "--enable-ra" in args
    assert f"--dhcp-range={G6},{G6},slaac,64" in args
    assert "--enable-ra" not in argv.dnsmasq_argv(load(), 0)


def test_passt_forwards_the_listed_ports_or_all_but_the_runners() -> None:
    s = load(binding="passt", ports=[{"port": 22}, {"port": 80}, {"port": 53, "protocol": "udp"}])
    args = argv.passt_argv(s, 0, 7, "passt")
    assert args[args.index("--fd") + 1] == "7" and "--no-map-gw" in args
    assert args[args.index("--tcp-ports") + 1] == "22,80"
    assert args[args.index("--udp-ports") + 1] == "53"
    every = argv.passt_argv(load(binding="passt"), 0, 7, "passt", [Port(port=9464)])
    assert every[every.index("--tcp-ports") + 1] == "~9464"
    assert every[every.index("--udp-ports") + 1] == "all"


def test_a_passt_nic_has_the_pods_addresses() -> None:
    with pytest.raises(spec.SpecError, match="takes no tap or ipv6_prefix"):
        load(binding="passt", ipv6_prefix="fd10:0:2::/64")
    with pytest.raises(spec.SpecError, match="takes no tap or ipv6_prefix"):
        load(binding="passt", tap="t0")
    assert not load(binding="passt").nics[0].makes_tap


def test_bandwidth_shaped_towards_the_guest_and_policed_from_it() -> None:
    net = netplan.plan(load(bandwidth={"ingress_mbit": 100, "egress_mbit": 8}), ())
    assert net.taps[0].ingress_mbit == 100 and net.taps[0].burst_kb == 64
    assert net.egress == (netrules.Limit(tap="tap0", mbit=8, burst_kb=64),)
    doc = netrules.limits([netrules.Limit(tap="tap0", mbit=8, burst_kb=64)])
    chains = [c["add"]["chain"] for c in doc["nftables"] if "chain" in c.get("add", {})]
    assert chains[0]["hook"] == "ingress" and chains[0]["dev"] == "tap0"
    (rule,) = [c["add"]["rule"]["expr"] for c in doc["nftables"] if "rule" in c.get("add", {})]
    assert (
        rule[0]["limit"]["rate"] == 1000 and rule[0]["limit"]["inv"] and rule[1] == {"drop": None}
    )


@pytest.mark.parametrize(
    ("nic", "message"),
    [
        ({"binding": "passt", "bandwidth": {"ingress_mbit": 8}}, "not for a passt or tap-fd"),
        ({"bandwidth": {}}, "needs ingress_mbit, egress_mbit or both"),
        ({"bandwidth": {"egress_mbit": 0}}, "between 1 and 400000"),
        ({"bandwidth": {"egress_mbit": 8, "burst_kb": 1}}, "burst_kb 1"),
    ],
)
def test_bandwidth_refused(nic: dict[str, object], message: str) -> None:
    with pytest.raises(spec.SpecError, match=message):
        load(**nic)


def test_the_pods_resolver_bounded_as_libc_bounds_it() -> None:
    text = (
        "# kubelet\nsearch ns.svc.cluster.local svc.cluster.local bad_label -x- cluster.local\n"
        "nameserver 10.96.0.10\nnameserver fd00::a\nnameserver not-an-address\n"
        "nameserver 10.0.0.2\nnameserver 10.0.0.3\noptions ndots:5\n"
    )
    r = netrules.parse_resolv_conf(text)
    assert [str(a) for a in r.nameservers] == ["10.96.0.10", "fd00::a", "10.0.0.2"]
    assert r.search == ("ns.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert netrules.parse_resolv_conf("\udcff garbage\n") == netrules.Resolver()


def test_the_default_routes_interface() -> None:
    route = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
        "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n"
    )
    assert netrules.default_interface(route) == "eth0"
    assert netrules.default_interface(route.splitlines()[0]) is None


@pytest.mark.parametrize(
    ("name", "host"), [("vm-1", "vm-1"), ("gpu_node_7", "gpu-node-7"), ("-", None), ("a.b", "a.b")]
)
def test_the_instance_name_as_host_name(name: str, host: str | None) -> None:
    assert netrules.hostname(name) == host


def test_a_helper_binary_is_looked_for_only_when_needed() -> None:
    from runner.run.options import StartupError
    from runner.run.preflight import _helper

    assert _helper("passt", "/nonexistent/passt", "a passt nic", needed=False) == ""
    line = r"^passt binary '/nonexistent/passt' not found \(needed by a passt nic\)$"
    with pytest.raises(StartupError, match=line):
        _helper("passt", "/nonexistent/passt", "a passt nic", needed=True)
    assert _helper("sh", "sh", "a test", needed=True).endswith("/sh")


def test_ipv6_dns_servers_go_by_dhcpv6_and_router_advertisements() -> None:
    s = load(
        binding="masquerade",
        ipv6_prefix="fd10:0:2::/64",
        dns6=["fd00:10:96::a"],
        search=["svc.cluster.local"],
    )
    args = argv.dnsmasq_argv(s, 0)
    assert "--dhcp-option=option6:dns-server,[fd00:10:96::a]" in args
    assert "--dhcp-option=option6:domain-search,svc.cluster.local" in args
    assert not [a for a in argv.dnsmasq_argv(load(), 0) if "option6" in a]
    with pytest.raises(spec.SpecError, match="dns6 needs an ipv6_prefix"):
        load(dns6=["fd00::a"])
    with pytest.raises(spec.SpecError, match="not an IPv6 address"):
        load(ipv6_prefix="fd10:0:2::/64", dns6=["10.0.0.1"])
    with pytest.raises(spec.SpecError, match="at most 3"):
        load(dns=["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])


def test_the_pods_resolver_keeps_both_families() -> None:
    r = netrules.parse_resolv_conf("nameserver 10.96.0.10\nnameserver fd00:10:96::a\n")
    assert [str(a) for a in r.nameservers] == ["10.96.0.10", "fd00:10:96::a"]
