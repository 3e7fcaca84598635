"""QMP from trio: qemu.qmp's asyncio client, run on a private event loop in one thread.

Every call has a deadline; a cancelled trio caller cancels the asyncio side. QMP events are
forwarded into a trio channel and must be drained by the owner (qemu.qmp queues without bound).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import trio
from qemu.qmp import EventListener, QMPClient
from qemu.qmp.message import Message

T = TypeVar("T")


class QMPError(Exception):
    """QMP failed: no answer in time, connection lost, or QEMU refused a command."""


class QMP:
    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._client = QMPClient(name)
        self._token = trio.lowlevel.current_trio_token()
        self._events_send, self.events = trio.open_memory_channel[Message](math.inf)
        self._forwarder: concurrent.futures.Future[None] | None = None
        self._thread.start()

    async def _call(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(done.set)

        fut.add_done_callback(wake)
        try:
            with trio.fail_after(timeout):
                await done.wait()
        except trio.TooSlowError:
            fut.cancel()
            raise QMPError(f"QMP {what}: no answer within {timeout:g} s") from None
        except BaseException:
            fut.cancel()
            raise
        try:
            return fut.result()
        except QMPError:
            raise
        except Exception as e:
            raise QMPError(f"QMP {what}: {e}") from e

    async def connect(self, sock: socket.socket, timeout: float) -> None:
        """Speak QMP on an already connected socket (one end of a socketpair)."""
        await self._call(self._client.connect(sock), timeout, "connect")
        listener = EventListener()
        self._client.register_listener(listener)
        send = self._events_send

        def deliver(event: Message) -> None:
            # Runs in trio's thread as a run_sync_soon callback: it must never raise.
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                send.send_nowait(event)

        async def forward() -> None:
            async for event in listener:
                try:
                    self._token.run_sync_soon(deliver, event)
                except trio.RunFinishedError:
                    return

        self._forwarder = asyncio.run_coroutine_threadsafe(forward(), self._loop)

    async def execute(
        self, cmd: str, args: dict[str, object] | None = None, timeout: float = 10
    ) -> Any:
        return await self._call(self._client.execute(cmd, args), timeout, cmd)

    async def close(self, timeout: float = 5) -> None:
        """Disconnect (QEMU may already be gone) and stop the loop thread."""

        async def disconnect() -> None:
            if self._forwarder is not None:
                self._forwarder.cancel()
            # EOF after `quit`, or a dead QEMU: expected here.
            with contextlib.suppress(Exception):
                await self._client.disconnect()

        try:
            await self._call(disconnect(), timeout, "disconnect")
        except QMPError:
            pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
            self._loop.close()
            self._events_send.close()
