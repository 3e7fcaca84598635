"""What the privileged side makes in the pod's network namespace for the guest: the taps with
their gateway addresses and MTU, shaping towards each guest, the masquerade rules, policing
from each guest, and the sysctls these need. Pure.

The runner builds the plan from the spec. It is made by the runner itself (embedded mode, in its
own namespace) or, asked over RPC, by the node controller in the caller's namespace (controller
mode: the VM pod then holds no NET_ADMIN). The controller takes a plan from a pod, so a plan is
checked whole when it is built: every name, address and number bounded.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from runner import netrules
from runner.spec import InstanceSpec

MAX_TAPS = 16
MAX_PORTS = 256  # forwarded ports of one nic: one rule each (grouped by protocol)
MAX_MBIT = 400_000
MAX_BURST_KB = 1_048_576
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # Linux IFNAMSIZ is 16 with the NUL
# The sysctls a plan may set, as /proc/sys paths (`{tap}` the tap's name), and their values.
SYSCTL_VALUES = ("0", "1")


@attrs.frozen(kw_only=True)
class TapPlan:
    """One tap the guest's NIC attaches to: made persistent, owned by the runner's user (who
    then opens it without NET_ADMIN), and removed when the instance stops."""

    name: str
    gateway4: str  # the tap's address, with the guest subnet's prefix: "10.0.2.1/24"
    gateway6: str | None = None  # the tap's IPv6 address in the guest's /64
    mtu: int = 1500
    ingress_mbit: int | None = None  # towards the guest: htb on the tap
    burst_kb: int = 64

    def __attrs_post_init__(self) -> None:
        if not IFNAME.match(self.name):
            raise ValueError(f"tap name {self.name!r} must be 1-15 letters, digits, . _ -")
        try:
            gw = ipaddress.IPv4Interface(self.gateway4)
        except ValueError:
            raise ValueError(f"gateway4 {self.gateway4[:50]!r} is no IPv4 address/prefix") from None
        if not 8 <= gw.network.prefixlen <= 30:
            raise ValueError(f"gateway {self.gateway4}: the prefix must be between 8 and 30")
        if self.gateway6 is not None:
            try:
                gw6 = ipaddress.IPv6Interface(self.gateway6)
            except ValueError:
                raise ValueError(f"gateway6 {self.gateway6[:50]!r} is no IPv6 address") from None
            if gw6.network.prefixlen != 64:
                raise ValueError(f"gateway6 {self.gateway6} must be in a /64")
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"mtu {self.mtu} must be between 576 and 9000")
        if self.ingress_mbit is not None and not 1 <= self.ingress_mbit <= MAX_MBIT:
            raise ValueError(f"ingress_mbit {self.ingress_mbit} must be between 1 and {MAX_MBIT}")
        if not 2 <= self.burst_kb <= MAX_BURST_KB:
            raise ValueError(f"burst_kb {self.burst_kb} must be between 2 and {MAX_BURST_KB}")


@attrs.frozen(kw_only=True)
class NetworkPlan:
    taps: tuple[TapPlan, ...] = ()
    masquerade: netrules.Masquerade | None = None
    egress: tuple[netrules.Limit, ...] = ()  # from each guest: nftables' limit on the tap

    def __attrs_post_init__(self) -> None:
        names = [t.name for t in self.taps]
        if len(names) > MAX_TAPS:
            raise ValueError(f"{len(names)} taps: at most {MAX_TAPS}")
        if len(set(names)) != len(names):
            raise ValueError("tap names must be unique")
        if self.masquerade is not None:
            m = self.masquerade
            if m.tap not in names:
                raise ValueError(f"masquerade tap {m.tap!r} is not one of the plan's taps")
            if len(m.ports) > MAX_PORTS or len(m.reserved) > MAX_PORTS:
                raise ValueError(f"at most {MAX_PORTS} forwarded and {MAX_PORTS} reserved ports")
        limited = [lim.tap for lim in self.egress]
        if len(set(limited)) != len(limited) or not set(limited) <= set(names):
            raise ValueError("egress limits must name distinct taps of the plan")
        for lim in self.egress:
            if not 1 <= lim.mbit <= MAX_MBIT or not 2 <= lim.burst_kb <= MAX_BURST_KB:
                raise ValueError(f"egress limit of {lim.tap}: mbit or burst_kb out of range")

    @property
    def empty(self) -> bool:
        return not self.taps

    def sysctls(self) -> dict[str, str]:
        """What a masquerade nic needs, in the pod's namespace only: forwarding, and loopback
        sources routed to the tap (a connection to 127.0.0.1 that is DNATed to the guest)."""
        m = self.masquerade
        if m is None:
            return {}
        wanted = {"net/ipv4/ip_forward": "1", f"net/ipv4/conf/{m.tap}/route_localnet": "1"}
        if m.guest6 is not None:
            wanted["net/ipv6/conf/all/forwarding"] = "1"
        return wanted

    def check_restore(self, before: dict[str, str]) -> None:
        """Values to put back must be this plan's sysctls, each 0 or 1: a pod sends them."""
        allowed = self.sysctls()
        for key, value in before.items():
            if key not in allowed or value not in SYSCTL_VALUES:
                raise ValueError(f"cannot restore {key}={value[:20]!r}: not this plan's")


def plan(spec: InstanceSpec, reserved: tuple[netrules.Port, ...]) -> NetworkPlan:
    """The plan for a spec's NICs whose taps the runner makes (passt and tap-fd NICs have
    none); `reserved`, the runner's own ports, never forwarded to the guest."""
    taps: list[TapPlan] = []
    masquerade = None
    egress: list[netrules.Limit] = []
    for i, nic in enumerate(spec.nics):
        if not nic.makes_tap:
            continue
        name = spec.tap_name(i)
        gw6 = nic.gateway6_address
        bw = nic.bandwidth
        taps.append(
            TapPlan(
                name=name,
                gateway4=f"{nic.gateway_address}/{nic.prefix}",
                gateway6=None if gw6 is None else f"{gw6}/64",
                mtu=nic.link_mtu,
                ingress_mbit=None if bw is None else bw.ingress_mbit,
                burst_kb=64 if bw is None else bw.burst_kb,
            )
        )
        if bw is not None and bw.egress_mbit is not None:
            egress.append(netrules.Limit(tap=name, mbit=bw.egress_mbit, burst_kb=bw.burst_kb))
        if nic.binding == "masquerade":
            masquerade = netrules.Masquerade(
                tap=name,
                guest4=ipaddress.IPv4Address(nic.ip),
                gateway4=nic.gateway_address,
                guest6=spec.guest6(i),
                ports=nic.ports,
                reserved=reserved,
            )
    return NetworkPlan(taps=tuple(taps), masquerade=masquerade, egress=tuple(egress))
