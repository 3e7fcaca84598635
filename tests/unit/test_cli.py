from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from . import sysfs


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, env=env
    )


def test_every_run_option_reads_an_environment_variable() -> None:
    r = cli("run", "--help")
    assert r.returncode == 0
    options = set(re.findall(r"^\s+(--[a-z-]+)", r.stdout, re.M)) - {"--help"}
    assert {
        "--spec",
        "--cgroup-root",
        "--kubelet-dir",
        "--shutdown-timeout",
        "--qmp-timeout",
        "--log-format",
    } <= options
    for opt in options:
        env = "INSTANCE_RUNNER_" + opt[2:].upper().replace("-", "_")
        assert env in r.stdout.replace("\n", " ").replace("  ", ""), opt


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "Missing option '--spec'"),
        (["nonsense"], "No such command 'nonsense'"),
        (["run", "--spec", "x", "--log-format", "xml"], "Invalid value for '--log-format'"),
        (["run", "--spec", "x", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    r = cli(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert r.stderr.startswith("instance-runner: ")


def test_spec_from_the_environment(tmp_path: object) -> None:
    import os

    env = {
        **os.environ,
        "INSTANCE_RUNNER_SPEC": "/nonexistent/spec.json",
        "INSTANCE_RUNNER_LOG_FORMAT": "text",
    }
    r = cli("run", env=env)
    assert r.returncode == 1
    assert "cannot read spec /nonexistent/spec.json" in r.stderr or "must run as root" in r.stderr


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and "instance-runner" in r.stdout


def test_topology_shows_the_host_and_a_pods_plan(tmp_path: Path) -> None:
    snap = sysfs.recorded("testvm-2s2c2t")
    for key, value in snap.items():
        if not value.startswith("-> "):
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_text(value + "\n")
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "vm", "vcpus": 4, "memory_mib": 512}')
    r = cli("topology", "--sysfs", str(tmp_path), "--cpus", "4-7", "--spec", str(spec))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["nodes"]["1"] == {"cpus": "4-7", "cores": ["4-5", "6-7"], "distances": [20, 10]}
    plan = doc["plan"]
    assert (plan["sockets"], plan["cores"], plan["threads"]) == (1, 2, 2)
    assert plan["numa_nodes"] == [{"vcpus": [0, 1, 2, 3], "memory_mib": 512, "host_node": 1}]
    r = cli("topology", "--sysfs", str(tmp_path), "--cpus", "3-4", "--spec", str(spec))
    assert r.returncode == 1
    assert r.stderr == (
        "instance-runner: the spec asks for 4 vCPUs but the pod has 2 dedicated CPUs (3-4); "
        "they must be equal\n"
    )
    r = cli("topology", "--sysfs", str(tmp_path / "bus"))
    assert r.returncode == 1 and "not a sysfs mount" in r.stderr
