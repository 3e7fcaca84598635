"""One tenant's failure stays its own. Every long-lived task of the controller (a pod's
keeper, the float keeper's follow loop, the kernel-thread sweep) runs guarded: if it raises,
the failure is logged and counted and the task starts again after a backoff. It never ends the
server's nursery, and so never the other tenants' tasks or the socket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from runner.log import log

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
ERROR_TEXT = 300  # characters of an exception's text in a log line: it may quote a tenant


def describe(e: BaseException, limit: int = ERROR_TEXT) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + "…"


async def guarded(
    task: str,
    kind: str,
    run: Callable[[], Awaitable[None]],
    failed: Callable[[str], None],
    first: float = FIRST_BACKOFF,
    cap: float = MAX_BACKOFF,
) -> None:
    """`run` until it returns; each time it raises, log it (`task` names the instance),
    count it under `kind`, and start it again after 1, 2, 4 … `cap` seconds (back to `first`
    once a run has lasted longer than `cap`)."""
    delay = first
    while True:
        started = trio.current_time()
        try:
            await run()
            return
        except Exception as e:  # the point: nothing a task raises ends the server
            failed(kind)
            log.error("task-failed", task=task, error=describe(e), restart_in=delay)
        if trio.current_time() - started > cap:
            delay = first
        await trio.sleep(delay)
        delay = min(delay * 2, cap)
