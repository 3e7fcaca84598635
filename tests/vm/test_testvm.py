"""scripts/testvm: exit statuses, CPUs, topology, the environment inside, failures."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import REPO, VMRunner

# --- bad input: refused before anything boots ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus", "--", "true"], "unrecognized arguments: --bogus"),
        (["--cpus", "2"], "missing CMD"),
        (["--cpus", "2", "--"], "missing CMD"),
        (["--cpus", "0", "--", "true"], "--cpus must be between 1 and 255"),
        (["--cpus", "x", "--", "true"], "invalid int value"),
        (["--topology", "sockets=2,cores=0", "--", "true"], "cores must be a positive"),
        (["--topology", "sockets=2,dies=2", "--", "true"], "--topology wants"),
        (["--cpus", "3", "--topology", "sockets=2,cores=2", "--", "true"], "disagrees"),
        (["--memory", "64", "--", "true"], "--memory must be at least 256"),
        (["--kernel", "5.10", "--", "true"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_boots_nothing(
    testvm: VMRunner, args: list[str], message: str
) -> None:
    r = testvm.run(*args, timeout=30)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("testvm: ") and message in lines[0]
    assert testvm.leftovers() == []


def test_help_describes_every_option(testvm: VMRunner) -> None:
    r = testvm.run("--help", timeout=30)
    assert r.returncode == 0
    for opt in ("--cpus", "--topology", "--memory", "--timeout", "--kernel", "--accel"):
        assert opt in r.stdout


# --- real boots ----------------------------------------------------------------------------------


@pytest.mark.vm
def test_exit_status_is_the_commands(testvm: VMRunner) -> None:
    r = testvm.run("--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "to-out\n"
    assert "to-err\n" in r.stderr
    assert testvm.leftovers() == []


@pytest.mark.vm
def test_cpus_option_sets_the_guest_cpu_count(testvm: VMRunner) -> None:
    r = testvm.run(
        "--cpus", "4", "--", "python3", "-c", "import os; print(len(os.sched_getaffinity(0)))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "4\n"


@pytest.mark.vm
def test_topology_gives_numa_nodes_and_smt_siblings(testvm: VMRunner) -> None:
    script = textwrap.dedent("""
        cd /sys/devices/system
        ls -d node/node* | wc -l
        cat node/node0/cpulist node/node1/cpulist
        cat cpu/cpu0/topology/thread_siblings_list cpu/cpu5/topology/thread_siblings_list
        cat cpu/cpu4/topology/physical_package_id
    """)
    # 8 emulated CPUs boot slowly on a loaded 2-core host: more than the default deadline.
    r = testvm.run(
        "--topology",
        "sockets=2,cores=2,threads=2",
        "--boot-timeout",
        "300",
        "--",
        "sh",
        "-c",
        script,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "0-3", "4-7", "0-1", "4-5", "1"]


@pytest.mark.vm
def test_environment_inside(testvm: VMRunner, tmp_path: Path) -> None:
    """cgroup v2 with the controllers we need, the repo as cwd, the venv, tun, writable dirs,
    and the host's files untouched by what the VM writes."""
    marker = REPO / f".testvm-write-{tmp_path.name}"
    script = textwrap.dedent(f"""
        set -e
        pwd
        grep -c cgroup2 /proc/mounts
        cat /sys/fs/cgroup/cgroup.controllers
        grep -q '^tun ' /proc/modules && test -c /dev/net/tun && echo tun
        touch /tmp/x /run/x && echo writable
        echo hi > {marker} && cat {marker}
        .venv/bin/python -c 'import trio, qemu.qmp, attrs, cattrs, click; print("venv")'
        id -u
        test -z "$(grep -v '^0::' /proc/self/cgroup)" && echo pure-v2
    """)
    r = testvm.run("--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert out[0] == str(REPO)
    assert out[1] == "1"
    assert {"cpuset", "cpu", "memory", "pids"} <= set(out[2].split())
    assert out[3:10] == ["tun", "writable", "hi", "venv", "0", "pure-v2", ""]
    assert not marker.exists(), "a write inside the VM reached the host"


@pytest.mark.vm
@pytest.mark.slow
def test_kernel_612_boots_with_cgroup_v2_cpuset_tun_and_the_venv(testvm: VMRunner) -> None:
    """The 6.12 series (virtio built in, fscache merged into netfs.ko) boots to the same
    environment as 6.1: cgroup v2 with cpuset over every vCPU, a usable tun, the venv."""
    script = textwrap.dedent("""
        set -e
        uname -r
        grep -c cgroup2 /proc/mounts
        cat /sys/fs/cgroup/cgroup.controllers
        cat /sys/fs/cgroup/cpuset.cpus.effective
        ip tuntap add dev tap0 mode tap && ip link show tap0 > /dev/null && echo tap
        .venv/bin/python -c 'import trio, runner; print("venv")'
    """)
    r = testvm.run("--kernel", "6.12", "--cpus", "4", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert out[0].startswith("6.12."), out[0]
    assert out[1] == "1"
    assert {"cpuset", "cpu", "memory", "pids"} <= set(out[2].split())
    assert out[3:7] == ["0-3", "tap", "venv", ""]
    assert testvm.leftovers() == []


@pytest.mark.vm
def test_timeout_is_a_clear_error_and_stops_the_vm(testvm: VMRunner) -> None:
    start = time.monotonic()
    r = testvm.run("--timeout", "2", "--", "sleep", "600")
    assert r.returncode == 124
    assert "timed out after 2 s" in r.stderr
    assert time.monotonic() - start < 60
    assert testvm.leftovers() == []


@pytest.mark.vm
def test_kernel_panic_is_a_clear_error_not_a_hang(testvm: VMRunner) -> None:
    # No init anywhere: the kernel panics; panic=-1 and -no-reboot make QEMU exit.
    env = testvm.env(TESTVM_APPEND="rdinit=/nonexistent init=/nonexistent")
    r = testvm.run("--boot-timeout", "60", "--", "true", env=env)
    assert r.returncode == 125
    assert "kernel panic or boot failure" in r.stderr
    assert "Kernel panic" in r.stderr
    assert testvm.leftovers() == []


@pytest.mark.vm
def test_sigterm_stops_the_vm(testvm: VMRunner) -> None:
    proc = testvm.popen("--", "sh", "-c", "echo up; sleep 600")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert testvm.leftovers() == []


@pytest.mark.vm
def test_qemu_dies_with_a_killed_testvm(testvm: VMRunner) -> None:
    proc = testvm.popen("--", "sh", "-c", "echo up; sleep 600")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    assert testvm.qemus()
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while testvm.qemus() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert testvm.qemus() == []


@pytest.mark.vm
@pytest.mark.slow
def test_several_vms_at_once_do_not_interfere(testvm: VMRunner) -> None:
    script = "echo {n} > /tmp/who; sleep 2; cat /tmp/who; exit {n}"
    procs = [testvm.popen("--", "sh", "-c", script.format(n=n)) for n in (3, 4, 5)]
    results = [(p.wait(timeout=300), p.communicate()[0]) for p in procs]
    assert results == [(3, "3\n"), (4, "4\n"), (5, "5\n")]
    assert testvm.leftovers() == []
