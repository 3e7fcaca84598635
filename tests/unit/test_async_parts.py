"""The effectful async layers on the host (no cgroups needed): the reaper, the QMP bridge
against a real paused QEMU, and the teardown stack."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from runner.argv import Wiring, qemu_argv
from runner.procs import Reaper, exit_code
from runner.qmp import QMP, QMPError
from runner.run.teardown import Teardown
from runner.spec import InstanceSpec


async def reaping(
    reaper: Reaper, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGCHLD) as sigs:
        task_status.started()
        reaper.reap()
        async for _ in sigs:
            reaper.reap()


@pytest.fixture(autouse=True)
def subreaper() -> None:
    # Orphans of our children come back to this test process, as they would to PID 1.
    from runner.procs import become_subreaper

    become_subreaper()


async def test_reaper_reports_exit_codes_and_signals() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as n:
        await n.start(reaping, reaper)
        ok = reaper.spawn("ok", ["sh", "-c", "exit 3"])
        killed = reaper.spawn("killed", ["sleep", "30"])
        killed.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            assert await ok.wait() == 3
            assert await killed.wait() == 137
        n.cancel_scope.cancel()
    assert not ok.running and killed.exit_code == 137


async def test_reaper_collects_orphans_without_stealing_statuses() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as n:
        await n.start(reaping, reaper)
        # 20 orphans exit at once, racing the reaping of a known child.
        parent = reaper.spawn(
            "parent", ["sh", "-c", "for i in $(seq 20); do sleep 0.2 & done; exit 5"]
        )
        with trio.fail_after(10):
            assert await parent.wait() == 5
            while reaper.orphans_reaped < 20:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert reaper.orphans_reaped == 20


async def test_stop_escalates_to_sigkill() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as n:
        await n.start(reaping, reaper)
        stubborn = reaper.spawn("stubborn", ["sh", "-c", "trap '' TERM; sleep 30 & wait"])
        await trio.sleep(0.2)
        with trio.fail_after(10):
            assert await stubborn.stop(0.3) == 137
        n.cancel_scope.cancel()


async def test_children_lead_their_own_process_group() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as n:
        await n.start(reaping, reaper)
        child = reaper.spawn("c", ["sleep", "30"])
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        await child.stop(5)
        n.cancel_scope.cancel()


def test_exit_code_mapping() -> None:
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137


async def test_spawn_failure_is_an_oserror() -> None:
    with pytest.raises(FileNotFoundError):
        Reaper().spawn("x", ["/nonexistent/binary"])


# --- QMP bridge ------------------------------------------------------------------------------

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 is installed by scripts/setup",
)


@needs_qemu
async def test_qmp_bridge_with_a_paused_qemu() -> None:
    ours, theirs = socket.socketpair()
    spec = InstanceSpec(name="t", vcpus=2, memory_mib=32, accel="tcg")
    proc = subprocess.Popen(
        qemu_argv(spec, "tcg", Wiring(qmp_fd=theirs.fileno())), pass_fds=[theirs.fileno()]
    )
    theirs.close()
    qmp = QMP("t")
    try:
        await qmp.connect(ours, timeout=20)
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
        vcpus = await qmp.execute("query-cpus-fast")
        assert [v["cpu-index"] for v in vcpus] == [0, 1]
        names = {
            Path(f"/proc/{proc.pid}/task/{v['thread-id']}/comm").read_text().strip() for v in vcpus
        }
        assert names == {"CPU 0/TCG", "CPU 1/TCG"}
        await qmp.execute("cont")
        with trio.fail_after(10):
            event = await qmp.events.receive()
        assert event["event"] == "RESUME"
        with pytest.raises(QMPError, match="no-such-command"):
            await qmp.execute("no-such-command")
        await qmp.execute("quit")
        assert await trio.to_thread.run_sync(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await qmp.close()


async def test_qmp_deadline_on_a_silent_peer() -> None:
    ours, theirs = socket.socketpair()
    qmp = QMP("t")
    try:
        with pytest.raises(QMPError, match=r"no answer within 0\.3 s"):
            await qmp.connect(ours, timeout=0.3)
    finally:
        theirs.close()
        await qmp.close()


async def test_qmp_connect_to_a_dead_peer_fails_fast() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    qmp = QMP("t")
    try:
        with trio.fail_after(5), pytest.raises(QMPError):
            await qmp.connect(ours, timeout=30)
    finally:
        await qmp.close()


async def test_qmp_call_cancelled_by_the_caller() -> None:
    ours, theirs = socket.socketpair()
    qmp = QMP("t")
    try:
        with trio.move_on_after(0.2) as scope:
            await qmp.connect(ours, timeout=30)
        assert scope.cancelled_caught
    finally:
        theirs.close()
        await qmp.close()


# --- teardown stack -----------------------------------------------------------------------------


async def test_teardown_runs_in_reverse_despite_failures_and_cancellation() -> None:
    done: list[str] = []
    td = Teardown()

    def step(name: str, fail: bool = False, slow: bool = False):  # type: ignore[no-untyped-def]
        async def undo() -> None:
            if slow:
                await trio.sleep(10)
            done.append(name)
            if fail:
                raise RuntimeError(name)

        return undo

    td.push("first", step("first"))
    td.push("fails", step("fails", fail=True))
    td.push("too slow", step("slow", slow=True), timeout=0.2)
    td.push("last", step("last"))
    with trio.CancelScope() as outer:
        outer.cancel()  # a second signal arriving mid-teardown must not skip anything
        ok = await td.unwind()
    assert done == ["last", "fails", "first"]
    assert ok is False


def test_runner_refuses_this_host_plainly(tmp_path: Path) -> None:
    """On a machine without cpuset on cgroup v2 (hybrid v1, like our development machines), the
    runner says so in one line; elsewhere it still refuses (no pod), in one line."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "x", "vcpus": 1, "memory_mib": 64}')
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "run", "--spec", str(spec), "--log-format", "text"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, r.stderr
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if os.geteuid() == 0 and (
        not controllers.exists() or "cpuset" not in controllers.read_text().split()
    ):
        assert "cgroup v2" in errors[0] and "scripts/testvm" in errors[0]
