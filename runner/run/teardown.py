"""The undo stack: what start-up did, undone in reverse, each undo with its own deadline, all
shielded so that a second signal cannot skip cleanup."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from runner.log import log


class Teardown:
    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], Awaitable[object]], float]] = []

    def push(self, name: str, undo: Callable[[], Awaitable[object]], timeout: float = 10) -> None:
        self._undo.append((name, undo, timeout))

    async def unwind(self) -> bool:
        ok = True
        with trio.CancelScope(shield=True):
            while self._undo:
                name, undo, timeout = self._undo.pop()
                try:
                    with trio.fail_after(timeout):
                        await undo()
                    log.debug("undone", step=name)
                except Exception as e:
                    ok = False
                    log.error("teardown-failed", step=name, error=str(e) or type(e).__name__)
        return ok


def call(fn: Callable[..., object], *args: object, **kw: object) -> Callable[[], Awaitable[None]]:
    """A plain function as an undo."""

    async def run() -> None:
        fn(*args, **kw)

    return run
