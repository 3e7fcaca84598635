"""The network plan: what the runner asks to be made in its pod's network namespace, built
from the spec, and checked whole when it comes from a pod (the controller takes it over RPC)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import netplan, rpc, spec
from runner.netrules import Port


def load(**nic: object) -> spec.InstanceSpec:
    doc = {"name": "vm-1", "vcpus": 1, "memory_mib": 64, "kernel": "/k", "nics": [nic]}
    return spec.load(json.dumps(doc))


def test_a_masquerade_nic_with_ipv6_and_limits() -> None:
    s = load(
        binding="masquerade",
        ipv6_prefix="fd10:0:2::/64",
        mtu=1450,
        bandwidth={"ingress_mbit": 50, "egress_mbit": 10, "burst_kb": 128},
    )
    net = netplan.plan(s, (Port(port=9464),))
    (tap,) = net.taps
    assert (tap.name, tap.gateway4, tap.gateway6, tap.mtu) == (
        "tap0",
        "10.0.2.1/24",
        "fd10:0:2::1/64",
        1450,
    )
    assert tap.ingress_mbit == 50 and tap.burst_kb == 128
    assert net.masquerade is not None and net.masquerade.reserved == (Port(port=9464),)
    assert str(net.masquerade.guest6) == str(s.guest6(0))
    assert net.sysctls() == {
        "net/ipv4/ip_forward": "1",
        "net/ipv4/conf/tap0/route_localnet": "1",
        "net/ipv6/conf/all/forwarding": "1",
    }


def test_isolated_taps_need_no_sysctl_and_passt_no_tap() -> None:
    assert netplan.plan(load(binding="isolated"), ()).sysctls() == {}
    assert netplan.plan(load(), ()).masquerade is not None  # a tap's default binding
    assert netplan.plan(load(binding="passt"), ()).empty


def roundtrip(doc: dict[str, Any]) -> object:
    """As the controller decodes a pod's request: a refusal is the error it answers."""
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "makeNetwork", "params": doc})
    return rpc.decode_request(line.encode())


def plan_doc(**tap: object) -> dict[str, Any]:
    return {"uuid": "u", "plan": {"taps": [{"name": "tap0", "gateway4": "10.0.2.1/24", **tap}]}}


def test_the_plan_travels_as_it_was_made() -> None:
    s = load(binding="masquerade", ipv6_prefix="fd10:0:2::/64", ports=[{"port": 22}])
    net = netplan.plan(s, ())
    doc = {"uuid": "u", "plan": rpc.converter.unstructure(net)}
    req = roundtrip(doc)
    assert isinstance(req, rpc.Request) and req.params.plan == net


@pytest.mark.parametrize(
    ("tap", "message"),
    [
        ({"name": "a" * 16}, "tap name"),
        ({"name": "tap0/../x"}, "tap name"),
        ({"gateway4": "10.0.2.1/31"}, "prefix"),
        ({"gateway4": "fd10::1/64"}, "IPv4"),
        ({"gateway6": "fd10::1/48"}, "/64"),
        ({"mtu": 65536}, "mtu"),
        ({"ingress_mbit": 0}, "ingress_mbit"),
        ({"burst_kb": 1 << 30}, "burst_kb"),
        ({"gateway4": 167772673}, "expected str"),
    ],
)
def test_a_pods_plan_is_bounded(tap: dict[str, object], message: str) -> None:
    res = roundtrip(plan_doc(**tap))
    assert isinstance(res, rpc.Response) and res.error is not None
    assert res.error.code == rpc.INVALID_PARAMS and message in res.error.message, res.error


def test_a_plan_names_its_own_taps_only() -> None:
    doc = plan_doc()
    doc["plan"]["egress"] = [{"tap": "eth0", "mbit": 1, "burst_kb": 64}]
    res = roundtrip(doc)
    assert isinstance(res, rpc.Response) and res.error is not None and "egress" in res.error.message
    doc = plan_doc()
    doc["plan"]["masquerade"] = {"tap": "eth0", "guest4": "10.0.2.2", "gateway4": "10.0.2.1"}
    res = roundtrip(doc)
    assert (
        isinstance(res, rpc.Response)
        and res.error is not None
        and "masquerade" in res.error.message
    )
    doc = plan_doc()
    doc["plan"]["taps"] *= netplan.MAX_TAPS + 1
    res = roundtrip(doc)
    assert isinstance(res, rpc.Response) and res.error is not None


def test_only_the_plans_sysctls_come_back_and_only_as_0_or_1() -> None:
    net = netplan.plan(load(binding="masquerade"), ())
    net.check_restore({"net/ipv4/ip_forward": "0"})
    for bad in ({"kernel/core_pattern": "|/x"}, {"net/ipv4/ip_forward": "2"}):
        with pytest.raises(ValueError, match="not this plan's"):
            net.check_restore(bad)


@given(st.dictionaries(st.text(max_size=40), st.text(max_size=5), max_size=4))
def test_restore_refuses_anything_else(before: dict[str, str]) -> None:
    net = netplan.plan(load(binding="masquerade", ipv6_prefix="fd10:0:2::/64"), ())
    allowed = net.sysctls()
    ok = all(k in allowed and v in ("0", "1") for k, v in before.items())
    try:
        net.check_restore(before)
        assert ok
    except ValueError:
        assert not ok
