"""The controller's registration rule, as a pure function."""

from __future__ import annotations

import json

import pytest

from runner import cpus, kube, rpc
from runner.controller import policy
from runner.node.kubelet import Unknown
from runner.plan import Placed

UID = "0a1b2c3d-1111-2222-3333-444455556666"
OTHER = "0a1b2c3d-1111-2222-3333-777777777777"
CALLER = kube.parse_pod_cgroup(f"/kubepods/pod{UID}/{'c' * 64}")
ONLINE = frozenset(range(8))


def state(entries: dict[str, dict[str, str]], default: str = "0,5-7") -> kube.KubeletState:
    doc = {"policyName": "static", "defaultCpuSet": default, "entries": entries}
    return kube.parse_cpu_manager_state(json.dumps(doc))


def verdict(
    cpuset: str = "1-2",
    kubelet: kube.KubeletState | Unknown | None = None,
    container: str | None = "1-2",
    caller: kube.PodCgroup | None = CALLER,
    uuid: str = UID,
) -> cpus.CpuSet:
    return policy.may_register(
        caller,
        uuid,
        cpuset,
        cpus.parse(container) if container is not None else None,
        ONLINE,
        kubelet if kubelet is not None else state({UID: {"compute": "1-2"}}),
    )


def test_own_container_entry_is_granted() -> None:
    assert verdict() == {1, 2}


def test_a_sidecar_with_its_own_cpus_does_not_matter() -> None:
    # Measured before: "cpuset 1-2 is not the pod's exclusive allocation (1-3)".
    both = state({UID: {"compute": "1-2", "sidecar": "3"}}, default="0,4-7")
    assert verdict(kubelet=both) == {1, 2}


def test_an_init_containers_leftover_entry_does_not_matter() -> None:
    leftover = state({UID: {"init": "1-4", "compute": "1-2"}}, default="0,5-7")
    assert verdict(kubelet=leftover) == {1, 2}


def test_unknown_state_grants_nothing() -> None:
    # Once granted blind: a Burstable caller asking for 0-3 got it while the file was missing.
    with pytest.raises(rpc.RPCError) as e:
        verdict(kubelet=Unknown("cpu_manager_state is missing"))
    assert e.value.code == rpc.BUSY and "cpu_manager_state is missing" in e.value.message


@pytest.mark.parametrize(
    "cpuset",
    ["0-50000000", "0-4294967295:1/4294967295", "9", "0-7,0-7", ",".join(["1"] * 9)],
)
def test_a_list_beyond_the_node_is_refused_before_it_is_expanded(cpuset: str) -> None:
    with pytest.raises(rpc.RPCError) as e:
        verdict(cpuset=cpuset, container=cpuset if len(cpuset) < 9 else "1-2")
    assert e.value.code in (rpc.INVALID_PARAMS, rpc.FORBIDDEN)
    assert len(e.value.message) < 200


@pytest.mark.parametrize(
    ("kw", "code", "message"),
    [
        ({"uuid": "../etc"}, rpc.INVALID_PARAMS, "is not a pod UID"),
        ({"caller": None}, rpc.FORBIDDEN, "not in a pod's container cgroup"),
        ({"uuid": OTHER}, rpc.FORBIDDEN, "may not act for pod"),
        ({"cpuset": "x"}, rpc.INVALID_PARAMS, "invalid params"),
        ({"cpuset": ""}, rpc.INVALID_PARAMS, "cpuset is empty"),
        ({"cpuset": "1-9", "container": "1-9"}, rpc.INVALID_PARAMS, "beyond this node"),
        ({"container": None}, rpc.FORBIDDEN, "container cgroup is gone"),
        ({"cpuset": "1"}, rpc.FORBIDDEN, "is not the pod's"),
        (
            {"kubelet": state({UID: {"compute": "1-3"}})},
            rpc.FORBIDDEN,
            "no container's exclusive allocation",
        ),
        ({"kubelet": state({})}, rpc.FORBIDDEN, "none listed"),
        ({"kubelet": state({UID: {"compute": "1-2"}}, "0-2")}, rpc.FORBIDDEN, "shared CPUs"),
    ],
)
def test_refusals(kw: dict[str, object], code: int, message: str) -> None:
    with pytest.raises(rpc.RPCError, match=message) as e:
        verdict(**kw)  # type: ignore[arg-type]
    assert e.value.code == code


def test_taking_against_live_instances() -> None:
    assert policy.may_take(UID, frozenset({1}), {}) is False
    assert policy.may_take(UID, frozenset({1}), {UID: frozenset({1})}) is True
    with pytest.raises(rpc.RPCError, match="is live with cpuset 2") as e:
        policy.may_take(UID, frozenset({1}), {UID: frozenset({2})})
    assert e.value.code == rpc.CONFLICT
    with pytest.raises(rpc.RPCError, match=f"already held by instance.*{OTHER}"):
        policy.may_take(UID, frozenset({1, 2}), {OTHER: frozenset({2, 3})})


def test_a_caller_outside_our_pid_namespace_is_told_about_host_pid() -> None:
    with pytest.raises(rpc.RPCError) as e:
        policy.may_register(None, UID, "1-2", None, ONLINE, state({}), hidden=True)
    assert e.value.code == rpc.FORBIDDEN and "hostPID: true" in e.value.message
    with pytest.raises(rpc.RPCError) as e:
        policy.check_caller(None, UID, hidden=True)
    assert "hostPID: true" in e.value.message


def test_a_node_without_the_static_policy_is_refused_by_name() -> None:
    # Under "none" the container's cpuset is every CPU and nothing is dedicated.
    none = kube.parse_cpu_manager_state('{"policyName":"none","defaultCpuSet":""}')
    with pytest.raises(rpc.RPCError) as e:
        verdict(cpuset="0-7", container="0-7", kubelet=none)
    assert e.value.code == rpc.FORBIDDEN
    assert "is 'none', not 'static'" in e.value.message


# --- who may move threads for a pod: the PID namespace that registered it -----------------------

NS, OTHER_NS, NODE_NS = 4026532001, 4026532002, 4026531836


def tenant(uuid: str = UID, caller_ns: int | None = NS, hidden: bool = False) -> int:
    return policy.check_tenant(uuid, caller_ns, {UID: NS, OTHER: NODE_NS}, NODE_NS, hidden)


def test_the_registering_namespace_may_act_for_its_pod() -> None:
    assert tenant() == NS


@pytest.mark.parametrize(
    ("kw", "code", "words"),
    [
        ({"caller_ns": OTHER_NS}, rpc.FORBIDDEN, "not of pod"),
        ({"caller_ns": None}, rpc.FORBIDDEN, "cannot be known"),
        ({"hidden": True}, rpc.FORBIDDEN, "cannot be known"),
        ({"uuid": "0a1b2c3d-1111-2222-3333-888888888888"}, rpc.FORBIDDEN, "has not registered"),
        ({"uuid": "../float"}, rpc.INVALID_PARAMS, "not a pod UID"),
        # A hostPID pod registered from the node's namespace: anyone could pass for it.
        ({"uuid": OTHER, "caller_ns": NODE_NS}, rpc.FORBIDDEN, "hostPID"),
    ],
)
def test_anyone_else_is_refused(kw: dict[str, object], code: int, words: str) -> None:
    with pytest.raises(rpc.RPCError) as e:
        tenant(**kw)  # type: ignore[arg-type]
    assert e.value.code == code
    assert words in e.value.message


def test_a_placement_stays_on_the_instance_cpus_one_vcpu_per_cpu() -> None:
    own = frozenset({2, 3})
    policy.check_placement([Placed(0, 10, 2), Placed(1, 11, 3, 5)], own, RT_ON)
    bad = [
        ([], rpc.INVALID_PARAMS),
        ([Placed(0, 10, 4)], rpc.FORBIDDEN),  # another pod's CPU
        ([Placed(0, 10, 2), Placed(1, 11, 2)], rpc.INVALID_PARAMS),  # one CPU twice
        ([Placed(0, 10, 2), Placed(0, 11, 3)], rpc.INVALID_PARAMS),  # one vCPU twice
        ([Placed(0, 0, 2)], rpc.INVALID_PARAMS),
        ([Placed(0, -5, 2)], rpc.INVALID_PARAMS),
        ([Placed(0, 10, 2, 100)], rpc.INVALID_PARAMS),
        ([Placed(0, 10, 2, -1)], rpc.INVALID_PARAMS),
        ([Placed(0, 10, 2), Placed(1, 10, 3)], rpc.INVALID_PARAMS),  # one thread twice
    ]
    for vcpus, code in bad:
        with pytest.raises(rpc.RPCError) as e:
            policy.check_placement(vcpus, own, RT_ON)
        assert e.value.code == code, vcpus


RT_ON = policy.Realtime(max_priority=10, throttling=(950000, 1000000))


@pytest.mark.parametrize(
    ("realtime", "priority", "words"),
    [
        (policy.Realtime(), 99, "above this node's cap (1"),  # the default cap: KubeVirt's 1
        (policy.Realtime(10, (950000, 1000000)), 11, "above this node's cap (10"),
        (policy.Realtime(99, (-1, 1000000)), 99, "RT throttling is off"),
        (policy.Realtime(99, (0, 1000000)), 1, "no time at all"),
        (policy.Realtime(99, None), 1, "cannot be read"),
    ],
)
def test_realtime_is_the_nodes_decision(
    realtime: policy.Realtime, priority: int, words: str
) -> None:
    with pytest.raises(rpc.RPCError) as e:
        policy.check_placement([Placed(0, 10, 2, priority)], frozenset({2}), realtime)
    assert e.value.code == rpc.FORBIDDEN and words in e.value.message
    # Without FIFO, throttling does not matter.
    policy.check_placement([Placed(0, 10, 2)], frozenset({2}), realtime)
