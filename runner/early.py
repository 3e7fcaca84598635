"""The console script's first module: it catches stop signals before anything heavy is
imported. As PID 1 the runner ignores every signal it has no handler for, and importing
trio, click, cattrs and qemu.qmp takes seconds on a loaded node: a SIGTERM in that window
would be lost, and the pod would run on until kubelet's SIGKILL. A signal caught here is
remembered; the runner and the controller act on it as soon as they handle signals
themselves. Only the interpreter's own start, before this module runs, stays uncovered.
"""

from __future__ import annotations

import signal
from types import FrameType

_caught: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _caught.append(signum)


def install() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _remember)


def stop_requested() -> int | None:
    """The first stop signal that arrived before the real handlers were in place."""
    return _caught[0] if _caught else None


def main() -> None:
    install()
    from runner.cli import main as cli_main

    cli_main()
