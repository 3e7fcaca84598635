"""The nftables rules of a masquerade NIC, as nftables' JSON document (`nft -j -f -`). Pure.

The guest sits on a tap behind the pod's address, as KubeVirt's masquerade binding has it:
- outgoing: the guest's addresses are masqueraded to the pod's on every other interface;
- incoming: connections to the pod (on any interface but the tap) are DNATed to the guest, on
  every TCP, UDP and SCTP port or on the listed ones, never on the runner's own ports; clients
  keep their real source address;
- the pod's loopback: a connection to 127.0.0.1 on a forwarded port reaches the guest (SNATed to
  the gateway, so the guest can answer; the tap needs `route_localnet`);
- the guest reaches nothing of its pod but DHCP, router solicitations and ping: a hostile guest
  cannot talk to the runner's ports or its pod's loopback. Replies to connections the pod made
  are let through.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any, Literal

import attrs

TABLE = "instance_runner"
Protocol = Literal["tcp", "udp"]
Json = dict[str, Any]


@attrs.frozen(kw_only=True)
class Port:
    port: int
    protocol: Protocol = "tcp"

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} must be between 1 and 65535")


@attrs.frozen(kw_only=True)
class Masquerade:
    """One NIC's addresses as the rules need them."""

    tap: str
    guest4: ipaddress.IPv4Address
    gateway4: ipaddress.IPv4Address
    guest6: ipaddress.IPv6Address | None = None
    ports: tuple[Port, ...] = ()  # () = every port
    reserved: tuple[Port, ...] = ()  # the runner's own: never forwarded


def _match(left: Json, right: object, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _iif(name: str, op: str = "==") -> Json:
    return _match({"meta": {"key": "iifname"}}, name, op)


def _oif(name: str, op: str = "==") -> Json:
    return _match({"meta": {"key": "oifname"}}, name, op)


def _addr(family: str, field: str, value: str, op: str = "==") -> Json:
    return _match({"payload": {"protocol": family, "field": field}}, value, op)


def _dport(protocol: str, ports: Sequence[int]) -> Json:
    values = sorted(set(ports))
    right: object = values[0] if len(values) == 1 else {"set": values}
    return _match({"payload": {"protocol": protocol, "field": "dport"}}, right)


def _by_protocol(ports: Sequence[Port]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in ports:
        out.setdefault(p.protocol, []).append(p.port)
    return dict(sorted(out.items()))


def _rule(chain: str, *expr: Json, table: str) -> Json:
    return {"add": {"rule": {"family": "inet", "table": table, "chain": chain, "expr": list(expr)}}}


def _chain(name: str, kind: str, hook: str, prio: int, table: str) -> Json:
    return {
        "add": {
            "chain": {
                "family": "inet",
                "table": table,
                "name": name,
                "type": kind,
                "hook": hook,
                "prio": prio,
                "policy": "accept",
            }
        }
    }


def _to_guest(nic: Masquerade, chain: str, match: Sequence[Json], table: str) -> list[Json]:
    """DNAT to the guest on the listed ports (or every TCP, UDP and SCTP port), the runner's
    own ports excepted."""
    out = [
        _rule(chain, *match, _dport(proto, ports), {"return": None}, table=table)
        for proto, ports in _by_protocol(nic.reserved).items()
    ]
    targets: list[tuple[str, str]] = [("ip", str(nic.guest4))]
    if nic.guest6 is not None and chain == "prerouting":
        targets.append(("ip6", str(nic.guest6)))
    if nic.ports:
        selectors = [_dport(proto, ports) for proto, ports in _by_protocol(nic.ports).items()]
    else:
        selectors = [_match({"meta": {"key": "l4proto"}}, {"set": ["tcp", "udp", "sctp"]})]
    for family, addr in targets:
        if chain == "output":  # the pod's own loopback, IPv4 only
            where = [_addr("ip", "daddr", "127.0.0.1")]
        else:
            where = [_match({"meta": {"key": "nfproto"}}, "ipv4" if family == "ip" else "ipv6")]
        for selector in selectors:
            dnat = {"dnat": {"family": family, "addr": addr}}
            out.append(_rule(chain, *match, *where, selector, dnat, table=table))
    return out


def ruleset(nic: Masquerade, table: str = TABLE) -> Json:
    """The whole table, made anew: an existing table of that name is replaced."""
    t = {"family": "inet", "name": table}
    cmds: list[Json] = [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]
    cmds += [
        _chain("prerouting", "nat", "prerouting", -100, table),
        _chain("output", "nat", "output", -100, table),
        _chain("postrouting", "nat", "postrouting", 100, table),
        _chain("input", "filter", "input", 0, table),
    ]
    cmds.append(_rule("prerouting", _iif(nic.tap), {"return": None}, table=table))
    cmds += _to_guest(nic, "prerouting", [], table)
    cmds += _to_guest(nic, "output", [], table)
    guests = [("ip", nic.guest4)] + ([("ip6", nic.guest6)] if nic.guest6 is not None else [])
    cmds += [
        _rule(
            "postrouting",
            _addr(family, "saddr", str(addr)),
            _oif(nic.tap, "!="),
            {"masquerade": None},
            table=table,
        )
        for family, addr in guests
    ]
    cmds.append(
        _rule(
            "postrouting",
            _oif(nic.tap),
            _addr("ip", "saddr", "127.0.0.1"),
            {"snat": {"family": "ip", "addr": str(nic.gateway4)}},
            table=table,
        )
    )
    ct = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    cmds += [
        _rule("input", _iif(nic.tap), ct, {"accept": None}, table=table),
        _rule("input", _iif(nic.tap), _dport("udp", [67, 547]), {"accept": None}, table=table),
        _rule(
            "input",
            _iif(nic.tap),
            _match({"payload": {"protocol": "icmp", "field": "type"}}, "echo-request"),
            {"accept": None},
            table=table,
        ),
        _rule(
            "input",
            _iif(nic.tap),
            _match({"meta": {"key": "l4proto"}}, "ipv6-icmp"),
            {"accept": None},
            table=table,
        ),
        _rule("input", _iif(nic.tap), {"drop": None}, table=table),
    ]
    return {"nftables": cmds}


def removal(table: str = TABLE) -> Json:
    """Deletes the table if it is there (adding first makes the delete never fail)."""
    t = {"family": "inet", "name": table}
    return {"nftables": [{"add": {"table": t}}, {"delete": {"table": t}}]}


def eui64(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The address a guest makes by SLAAC from its MAC (RFC 4291 appendix A) in a /64."""
    if prefix.prefixlen != 64:
        raise ValueError(f"SLAAC needs a /64, not {prefix}")
    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return prefix.network_address + int.from_bytes(iid, "big")


@attrs.frozen(kw_only=True)
class Limit:
    """Traffic from a guest, policed as it enters its tap."""

    tap: str
    mbit: int
    burst_kb: int


def limits(taps: Sequence[Limit], table: str = TABLE) -> Json:
    """A `netdev` table with one ingress chain per tap: packets over the rate are dropped
    (the host kernel may lack tc's police action; nftables' limit does the same)."""
    t = {"family": "netdev", "name": table}
    cmds: list[Json] = [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]
    for lim in taps:
        chain = f"from_{lim.tap}"
        cmds.append(
            {
                "add": {
                    "chain": {
                        "family": "netdev",
                        "table": table,
                        "name": chain,
                        "type": "filter",
                        "hook": "ingress",
                        "dev": lim.tap,
                        "prio": 0,
                        "policy": "accept",
                    }
                }
            }
        )
        rate = {
            "rate": lim.mbit * 125,  # kbytes per second
            "rate_unit": "kbytes",
            "per": "second",
            "burst": lim.burst_kb,
            "burst_unit": "kbytes",
            "inv": True,
        }
        expr = [{"limit": rate}, {"drop": None}]
        cmds.append(
            {"add": {"rule": {"family": "netdev", "table": table, "chain": chain, "expr": expr}}}
        )
    return {"nftables": cmds}


def limits_removal(table: str = TABLE) -> Json:
    t = {"family": "netdev", "name": table}
    return {"nftables": [{"add": {"table": t}}, {"delete": {"table": t}}]}


# --- what a masquerade guest takes from its pod ---------------------------------------------------

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_NAMESERVERS, MAX_SEARCH = 3, 6  # glibc's MAXNS, and its historical search limit


def is_domain(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return 0 < len(text) <= 253 and all(_LABEL.match(label) for label in labels)


def hostname(name: str) -> str | None:
    """The instance name as the guest's host name (DHCP option 12), if it can be one."""
    label = name.replace("_", "-").strip("-.")
    return label if is_domain(label) else None


@attrs.frozen
class Resolver:
    nameservers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    search: tuple[str, ...] = ()


def parse_resolv_conf(text: str) -> Resolver:
    """The pod's /etc/resolv.conf (kubelet writes it): nameservers and search domains, bounded
    as the C library bounds them; what is not an address or a DNS name is skipped."""
    servers: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    search: list[str] = []
    for line in text.splitlines()[:1000]:
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and len(servers) < MAX_NAMESERVERS:
            try:
                servers.append(ipaddress.ip_address(words[1]))
            except ValueError:
                continue
        elif words and words[0] in ("search", "domain"):
            search = [w for w in words[1:] if is_domain(w)][:MAX_SEARCH]
    return Resolver(tuple(servers), tuple(search))


def default_interface(route: str) -> str | None:
    """The interface of the IPv4 default route, from /proc/net/route."""
    for line in route.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
            return fields[0]
    return None
