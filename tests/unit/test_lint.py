"""The code base stays ruff-clean, ruff-formatted and mypy-clean (runner/ strictly)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY_SCRIPTS = [
    "scripts/testvm",
    "scripts/podsim",
    "scripts/demo-inside",
    "scripts/measure-pin",
    "scripts/faults",
    "scripts/bench",
    "scripts/bench-inside",
]
TARGETS = ["runner", "tests", "images", *PY_SCRIPTS]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True)


def test_ruff_check() -> None:
    r = run("ruff", "check", "--output-format", "concise", *TARGETS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format() -> None:
    r = run("ruff", "format", "--check", *TARGETS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_runner() -> None:
    r = run("mypy")
    assert r.returncode == 0, r.stdout + r.stderr
