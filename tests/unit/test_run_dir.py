"""The run-dir step: one runner per directory, and nothing of another runner's touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.run.options import StartupError
from runner.run.steps import Startup, claim_run_dir, release_run_dir


class _Pre:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir


def startup(run_dir: Path) -> Startup:
    return Startup(None, _Pre(run_dir), None, None, None)  # type: ignore[arg-type]


async def test_a_run_dir_in_use_is_refused_and_left_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "pod"
    first, second = startup(run_dir), startup(run_dir)
    await claim_run_dir(first)
    with pytest.raises(StartupError, match="in use by another runner"):
        await claim_run_dir(second)
    await release_run_dir(second)  # the refused runner's teardown
    assert (run_dir / "lock").exists(), "the refused runner removed the other's lock"
    await release_run_dir(first)
    assert not run_dir.exists(), "the run dir the runner made is left behind"


async def test_a_given_run_dir_is_kept(tmp_path: Path) -> None:
    (tmp_path / "mine").write_text("x")
    s = startup(tmp_path)
    await claim_run_dir(s)
    await release_run_dir(s)
    assert (tmp_path / "mine").exists() and not (tmp_path / "lock").exists()
