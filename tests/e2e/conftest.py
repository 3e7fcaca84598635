"""Fixtures of the end-to-end tests: the small real guest, and a fresh network namespace."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import Netns, new_netns

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def guest_image() -> Path:
    out = subprocess.run(
        [sys.executable, str(REPO / "images/guest/build.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


@pytest.fixture
def netns(tmp_path: Path, guest_image: Path) -> Iterator[Netns]:
    with new_netns(tmp_path, guest_image) as ns:
        yield ns
