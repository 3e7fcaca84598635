from __future__ import annotations

import re
import subprocess
import sys

import pytest


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
