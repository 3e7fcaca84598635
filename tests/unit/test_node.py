"""The node's shared rules: the kubelet reader's policy, the float rule, the stale rule, and the
float keeper run against a cgroup tree in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from runner import cpus, kube
from runner.node.cgroupfs import CgroupError, CgroupFS, pressures
from runner.node.floatkeeper import FloatKeeper, FloatUnknown, float_target
from runner.node.kubelet import Unknown, read_state
from runner.node.layout import Instance, Layout, stale
from runner.node.pinning import Keeper
from runner.plan import Placed

UID_A = "0a1b2c3d-1111-2222-3333-444455556666"
UID_B = "0a1b2c3d-1111-2222-3333-777777777777"
ONLINE = frozenset(range(8))


def state(default: str, entries: dict[str, dict[str, str]] | None = None) -> kube.KubeletState:
    doc = {"policyName": "static", "defaultCpuSet": default, "entries": entries or {}}
    return kube.parse_cpu_manager_state(json.dumps({**doc, "checksum": 0}))


# --- the kubelet reader: one policy for missing, unreadable and incomplete ------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "is missing"),
        ("", "not JSON"),
        ('{"policyName":"static","defaultCpuSet":"0,3","entries":{"', "not JSON"),
        ('{"policyName":"static","checksum":1}', "lacks policyName or defaultCpuSet"),
        ('{"policyName":"static","defaultCpuSet":"x"}', "cpu_manager_state"),
        (b"\xff\xfe", "cannot read"),
    ],
)
def test_state_that_cannot_be_read_in_full_is_unknown(
    tmp_path: Path, text: str | bytes | None, reason: str
) -> None:
    if isinstance(text, bytes):
        (tmp_path / "cpu_manager_state").write_bytes(text)
    elif text is not None:
        (tmp_path / "cpu_manager_state").write_text(text)
    got = read_state(tmp_path)
    assert isinstance(got, Unknown)
    assert reason in got.reason


def test_state_read(tmp_path: Path) -> None:
    (tmp_path / "cpu_manager_state").write_text(
        json.dumps({"policyName": "static", "defaultCpuSet": "0,3", "checksum": 1})
    )
    got = read_state(tmp_path)
    assert isinstance(got, kube.KubeletState) and got.default_cpus == {0, 3}


# --- the float rule ------------------------------------------------------------------------


def test_float_is_kubelets_shared_cpus_online_less_what_instances_hold() -> None:
    assert float_target(state("0-1,3,5,7,9"), ONLINE, frozenset({3}), None) == {0, 1, 5, 7}


def test_policy_none_shares_every_cpu() -> None:
    none = kube.parse_cpu_manager_state('{"policyName":"none","defaultCpuSet":""}')
    assert float_target(none, ONLINE, frozenset({5}), frozenset({0})) == ONLINE - {5}


def test_unknown_state_keeps_float_and_never_widens_it() -> None:
    # Measured before: another pod held CPU 3, the file went, float became 0,2,3.
    unknown = Unknown("missing")
    assert float_target(unknown, frozenset(range(4)), frozenset({1}), frozenset({0, 2})) == {0, 2}
    assert float_target(unknown, frozenset(range(4)), frozenset(), None) is None


def test_nothing_left_is_no_answer() -> None:
    assert float_target(state("2"), ONLINE, frozenset({2}), frozenset({0})) is None


# --- the stale rule --------------------------------------------------------------------------


def inst(uuid: str, cpu_list: str, threads: int) -> Instance:
    return Instance(uuid, f"/instances/instance-{uuid}", cpus.parse(cpu_list), threads)


def test_stale_is_threadless_and_gone_from_kubelet() -> None:
    found = {UID_A: inst(UID_A, "2", 0), UID_B: inst(UID_B, "3", 0)}
    listed = state("0-1", {UID_B: {"compute": "3"}})
    assert [i.uuid for i in stale(found, listed)] == [UID_A]
    assert stale(found, listed, young=[UID_A]) == []
    assert stale({UID_A: inst(UID_A, "2", 2)}, listed) == []
    assert stale(found, Unknown("missing")) == []


# --- the keeper, on a cgroup tree in a temp dir ------------------------------------------------


class TreeFS(CgroupFS):
    """cgroupfs as plain files: a new cgroup gets the files the keeper reads."""

    def make_threaded(
        self, cgroup: str, cpu_set: cpus.CpuSet, mems: cpus.CpuSet = frozenset()
    ) -> None:
        d = self.dir(cgroup)
        d.mkdir(exist_ok=True)
        for name in ("cgroup.threads", "cgroup.procs", "cpuset.cpus"):
            (d / name).touch()
        (d / "cgroup.type").write_text("threaded\n")
        self.set_cpus(cgroup, cpu_set)

    async def remove(self, cgroup: str, attempts: int = 10, delay: float = 0.2) -> None:
        if not self.read(cgroup, "cgroup.threads").split():  # rmdir takes an empty cgroup
            shutil.rmtree(self.dir(cgroup))

    def set_cpus(self, cgroup: str, cpu_set: cpus.CpuSet) -> None:
        super().set_cpus(cgroup, cpu_set)
        (self.dir(cgroup) / "cpuset.cpus.effective").write_text(cpus.format(cpu_set) + "\n")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[TreeFS, Layout, Path]]:
    mount = tmp_path / "cg"
    (mount / "instances").mkdir(parents=True)
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    cg = TreeFS(mount)
    yield cg, Layout(cg, "/instances"), kubelet


def write_state(kubelet: Path, default: str, entries: dict[str, dict[str, str]]) -> None:
    doc = {"policyName": "static", "defaultCpuSet": default, "entries": entries, "checksum": 0}
    (kubelet / "cpu_manager_state").write_text(json.dumps(doc))


def keeper(layout: Layout, kubelet: Path, online: str = "0-3") -> FloatKeeper:
    return FloatKeeper(layout, str(kubelet), online=lambda: cpus.parse(online))


async def test_keeper_makes_float_from_kubelet(tree: tuple[TreeFS, Layout, Path]) -> None:
    cg, layout, kubelet = tree
    write_state(kubelet, "0,3", {UID_A: {"compute": "1-2"}})
    assert await keeper(layout, kubelet).resync("start") == {0, 3}
    assert cg.read(layout.float, "cpuset.cpus").strip() == "0,3"


async def test_a_sigkilled_runners_instance_goes_and_float_gets_its_cpus(
    tree: tuple[TreeFS, Layout, Path],
) -> None:
    cg, layout, kubelet = tree
    cg.make_threaded(layout.float, frozenset({0, 3}))
    cg.make_threaded(layout.instance(UID_A), frozenset({2}))  # its runner was SIGKILLed
    cg.make_threaded(layout.instance(UID_B), frozenset({1}))
    (cg.dir(layout.instance(UID_B)) / "cgroup.threads").write_text("12345\n")
    write_state(kubelet, "0,2,3", {UID_B: {"compute": "1"}})  # pod A has left kubelet
    assert await keeper(layout, kubelet).resync("kubelet") == {0, 2, 3}
    assert not cg.exists(layout.instance(UID_A))
    assert cg.exists(layout.instance(UID_B))
    assert cg.read(layout.float, "cpuset.cpus").strip() == "0,2-3"


async def test_a_missing_state_keeps_float_and_makes_none(
    tree: tuple[TreeFS, Layout, Path],
) -> None:
    cg, layout, kubelet = tree
    with pytest.raises(FloatUnknown, match="missing"):
        await keeper(layout, kubelet).resync("start")
    assert not cg.exists(layout.float)
    cg.make_threaded(layout.float, frozenset({0, 2}))
    assert await keeper(layout, kubelet).resync("kubelet") == {0, 2}
    assert cg.read(layout.float, "cpuset.cpus").strip() == "0,2"


async def test_cpus_being_taken_stay_out(tree: tuple[TreeFS, Layout, Path]) -> None:
    _cg, layout, kubelet = tree
    write_state(kubelet, "0-3", {})  # kubelet lags behind a pod that holds 1-2
    assert await keeper(layout, kubelet).resync("start", held=frozenset({1, 2})) == {0, 3}


async def test_float_that_grows_reaches_its_threads(tree: tuple[TreeFS, Layout, Path]) -> None:
    """6.2+ keeps a thread's own affinity across cpuset changes: the keeper spreads."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    cg, layout, kubelet = tree
    a, b = sorted(os.sched_getaffinity(0))[:2]
    cg.make_threaded(layout.float, frozenset({a}))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        os.sched_setaffinity(sleeper.pid, {a})
        (cg.dir(layout.float) / "cgroup.threads").write_text(f"{sleeper.pid}\n")
        write_state(kubelet, f"{a},{b}", {})
        await keeper(layout, kubelet, online=f"{a},{b}").resync("kubelet")
        assert os.sched_getaffinity(sleeper.pid) == {a, b}
    finally:
        sleeper.kill()
        sleeper.wait()


# --- verification never stops silently -----------------------------------------------------


async def test_verification_goes_on_after_a_read_error(
    tree: tuple[TreeFS, Layout, Path],
) -> None:
    """A check that cannot read a thread's cgroup is retried while QEMU lives (here: a pid
    that exists, with a thread that does not)."""
    cg, layout, _kubelet = tree
    cg.make_threaded(layout.float, frozenset({0}))
    keeper = Keeper(
        cg,
        "/container",
        layout.instance(UID_A),
        layout.float,
        os.getpid(),
        [Placed(0, 2**22 + 7, 0)],
        lambda: -1,
    )
    with trio.move_on_after(0.3) as scope:
        await keeper.keep(0.01)
    assert scope.cancelled_caught, "verification stopped at the first read error"


def test_a_cgroup_outside_the_namespace_view_is_never_read_below_the_mount(
    tmp_path: Path,
) -> None:
    """In a private cgroup namespace, float reads as "/../../instances/float": joined to the
    mount it would name a file of the container's own filesystem."""
    mount = tmp_path / "deep" / "cgroup"
    (tmp_path / "instances" / "float").mkdir(parents=True)
    (tmp_path / "instances" / "float" / "cpu.pressure").write_text("some total=1\n")
    mount.mkdir(parents=True)
    cg = CgroupFS(mount)
    with pytest.raises(CgroupError, match="outside this cgroup namespace"):
        cg.read("/../../instances/float", "cpu.pressure")
    with pytest.raises(CgroupError, match="outside this cgroup namespace"):
        cg.write("/../../instances/float", "cgroup.procs", "1")
    assert not cg.exists("/../../instances/float")
    assert pressures(cg, {"float": "/../../instances/float"}) == {}
