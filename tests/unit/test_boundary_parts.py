"""The controller's own parts of the tenant boundary that need no kernel of their own: the
guard that restarts a failing task, the socket it alone owns, a pod's part of float on a
cgroup tree in a temporary directory, and tenant records that hold their namespace."""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from runner.controller.guard import guarded
from runner.controller.socketfile import SocketError, SocketFile
from runner.controller.tenants import Tenants, hold_namespace
from runner.node import podfloat
from runner.node.cgroupfs import CgroupFS
from runner.node.layout import Layout


async def test_a_failing_task_is_restarted_with_backoff(autojump_clock: object) -> None:
    failures: list[str] = []
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 4:
            raise ValueError("a tenant's odd bytes")

    await guarded("keeper x", "keeper", flaky, failures.append)
    assert failures == ["keeper"] * 3
    gaps = [round(b - a) for a, b in itertools.pairwise(runs)]
    assert gaps == [1, 2, 4]


async def test_the_guard_never_lets_a_failure_out_into_the_nursery(autojump_clock: object) -> None:
    async def always() -> None:
        raise RuntimeError("boom")

    failures: list[str] = []
    with trio.move_on_after(100):
        async with trio.open_nursery() as n:
            n.start_soon(guarded, "t", "kind", always, failures.append)
    assert 5 <= len(failures) <= 10  # 1, 2, 4, 8, 16, 30, 30 ... within 100 s


def short_dir(tmp_path: Path) -> Path:
    d = Path(f"/tmp/sf-{os.getpid()}-{len(str(tmp_path)) % 97}")
    d.mkdir(exist_ok=True)
    return d


async def test_the_socket_is_noticed_when_removed_or_replaced(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    try:
        sf = SocketFile(str(d / "c.sock"))
        listener = await sf.bind()
        assert sf.changed() is None
        (d / "c.sock").unlink()
        assert sf.changed() == "removed"
        (d / "c.sock").write_text("x")
        assert sf.changed() == "replaced"
        await listener.aclose()
        listener = await sf.bind(takeover=True)
        assert sf.changed() is None
        assert [p.name for p in d.iterdir() if p.name.startswith("c.sock.stale-")]
        # A live socket at the path is another controller's: refused at start.
        with pytest.raises(SocketError, match="another controller"):
            await SocketFile(str(d / "c.sock")).bind()
        sf.remove()
        assert not (d / "c.sock").exists()
        await listener.aclose()
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


async def test_remove_leaves_a_socket_that_is_not_ours(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    try:
        sf = SocketFile(str(d / "c.sock"))
        listener = await sf.bind()
        (d / "c.sock").unlink()
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(d / "c.sock"))
        sf.remove()
        assert (d / "c.sock").exists()
        other.close()
        await listener.aclose()
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def tree(tmp_path: Path) -> tuple[CgroupFS, Layout]:
    for d in ("", "instances", "instances/float"):
        (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / d / "cgroup.subtree_control").write_text("")
        (tmp_path / d / "cgroup.controllers").write_text("cpuset cpu pids memory")
    return CgroupFS(tmp_path), Layout(CgroupFS(tmp_path), "/instances")


def test_a_pods_part_of_float_gets_its_bounds(tmp_path: Path) -> None:
    cg, layout = tree(tmp_path)
    assert podfloat.enable(cg, layout) == ("cpu", "pids")
    part = tmp_path / "instances/float/pod-u"
    # cgroupfs makes these files with the directory (empty here: a write to a plain file
    # does not truncate it).
    part.mkdir()
    for name in ("cgroup.type", "pids.max", "cpu.max"):
        (part / name).write_text("")
    path = podfloat.make(cg, layout, "u", podfloat.FloatLimits(pids_max=64, cpus=0.5))
    assert path == "/instances/float/pod-u" == layout.float_of("u")
    assert (part / "pids.max").read_text() == "64"
    assert (part / "cpu.max").read_text() == "50000 100000"
    assert (part / "cgroup.type").read_text() == "threaded"
    assert layout.pod_floats() == {"u": path}
    for name in ("pids.max", "cpu.max"):
        (part / name).write_text("")
    podfloat.make(cg, layout, "u", podfloat.FloatLimits(pids_max=None, cpus=None))
    assert (part / "pids.max").read_text() == "max"
    assert (part / "cpu.max").read_text() == "max 100000"


@pytest.mark.parametrize(("cpus", "text"), [(1.0, "100000 100000"), (0.001, "1000 100000")])
def test_cpu_max(cpus: float, text: str) -> None:
    assert podfloat.cpu_max(cpus) == text


def test_a_tenant_record_holds_its_namespace_and_is_refreshed(tmp_path: Path) -> None:
    cg, layout = tree(tmp_path)
    tenants = Tenants(cg, layout)
    ns = os.stat("/proc/self/ns/pid").st_ino
    first = tenants.book("u", "/kubepods/a", os.getpid(), ns)
    fd = first.ns_fd
    assert os.fstat(fd).st_ino == ns
    again = tenants.book("u", "/kubepods/b", os.getpid(), ns)
    assert again is first and again.container == "/kubepods/b" and again.ns_fd != -1
    with pytest.raises(OSError):
        os.fstat(fd)  # the old fd let go
    with pytest.raises(ProcessLookupError):
        hold_namespace(os.getpid(), ns + 1)
    tenants.forget("u")
    assert "u" not in tenants.by_uuid and first.ns_fd == -1
