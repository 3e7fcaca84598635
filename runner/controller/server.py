"""The controller's daemon: the Unix socket, the bound on connections, the serve loop, and
the float keeper's follow loop beside it. The handlers are in service.py."""

from __future__ import annotations

import contextlib
import functools
import signal

import trio

from runner import early, httpd, rpc
from runner.controller.guard import describe, guarded
from runner.controller.identity import Peer, identify
from runner.controller.metrics import Held
from runner.controller.service import ControllerError, ControllerOptions, Service
from runner.controller.socketfile import SocketError, SocketFile
from runner.log import log

# A bound on open connections (memory), far above what a node's runners need at once. A
# slow caller cannot hold the cgroup lock (no sleeping under it), and idle ones are dropped.
MAX_CONNECTIONS = 1024
# A bound per caller (a pod, see Service.caller_key): a runner holds one connection at a time,
# its scrapes one more. One pod that opens connections and holds them locks only itself out.
MAX_PER_CALLER = 8
# A caller says what it wants at once: a connection with no whole request after this long is
# closed (an idle one after the controller's idle timeout).
FIRST_REQUEST_TIMEOUT = 2.0
SOCKET_CHECK = 1.0  # how often the socket's path is checked to still lead to it
REFUSAL_LOG_EVERY = 10.0


class Server:
    def __init__(self, opts: ControllerOptions) -> None:
        self.opts = opts
        self.service = Service(opts)
        self.socket = SocketFile(opts.socket)
        self._open = 0
        self._by_caller: dict[str, int] = {}  # open connections by caller (caller_key)
        self._refusal_logged: dict[str, float] = {}  # when each caller's refusal was logged
        # The service's layout is replaced at setup: read through it each time.
        self.service.metrics.hold(
            Held(
                instances=lambda: len(self.service.layout.instances()),
                float_cpus=lambda: _count(self.service.layout.float_cpus()),
                connections=lambda: self._open,
                stale_removed=lambda: self.service.keeper.removed,
                kernel_threads_moved=lambda: self.service.kernel_threads_moved,
                kept=self.service.tenants.kept,
            )
        )

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """One connection; whatever goes wrong in it closes it alone."""
        try:
            await self._connection(stream)
        except Exception as e:  # never out into serve_listeners' nursery
            self.service.metrics.task_failed("connection")
            log.error("connection-failed", error=describe(e))
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        # Who the caller is, once and at once: later, its pid may be someone else's.
        peer = identify(stream.socket)  # type: ignore[arg-type]
        caller = self.service.caller_key(peer)
        if self._open >= MAX_CONNECTIONS or (
            caller is not None and self._by_caller.get(caller, 0) >= MAX_PER_CALLER
        ):
            whole = self._open >= MAX_CONNECTIONS
            self.service.metrics.answered("-", rpc.BUSY)
            # Counted every time, logged once per caller every REFUSAL_LOG_EVERY seconds: a
            # pod that opens connections in a loop does not fill the node's disk.
            now, key = trio.current_time(), caller or "node"
            if now - self._refusal_logged.get(key, -REFUSAL_LOG_EVERY) >= REFUSAL_LOG_EVERY:
                if len(self._refusal_logged) >= MAX_CONNECTIONS:
                    self._refusal_logged.clear()  # pods come and go: never a growing map
                self._refusal_logged[key] = now
                log.warning(
                    "connection-refused",
                    pid=peer.pid,
                    caller=key,
                    reason="too many open connections"
                    + ("" if whole else f" from one caller ({MAX_PER_CALLER})"),
                )
            await stream.aclose()
            return
        self._open += 1
        if caller is not None:
            self._by_caller[caller] = self._by_caller.get(caller, 0) + 1
        try:
            await self._serve(stream, peer)
        finally:
            self._open -= 1
            if caller is not None:
                self._by_caller[caller] -= 1
                if not self._by_caller[caller]:
                    del self._by_caller[caller]

    async def _serve(self, stream: trio.SocketStream, peer: Peer) -> None:
        reader = rpc.LineReader(stream)
        async with stream:
            try:
                wait = min(FIRST_REQUEST_TIMEOUT, self.opts.idle_timeout)
                while True:
                    # A silent client gets `wait`, then the door: it cannot hold a connection
                    # slot for long.
                    with trio.move_on_after(wait) as idle:
                        line = await reader.readline()
                    if idle.cancelled_caught:
                        log.debug("connection-idle", pid=peer.pid)
                        return
                    if line is None:
                        return
                    wait = self.opts.idle_timeout
                    response = await self.service.dispatch(peer, line)
                    if response is None:
                        return  # a notification: never answered, so the connection ends
                    with trio.move_on_after(self.opts.idle_timeout) as sending:
                        await stream.send_all(rpc.encode_response(response))
                    if sending.cancelled_caught:
                        log.debug("connection-stalled", pid=peer.pid)
                        return  # half a response is on the wire: this stream is done
            except ValueError:
                log.warning("message-too-large", pid=peer.pid, limit=rpc.MAX_MESSAGE)
                with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(
                        rpc.encode_response(
                            rpc.error(None, rpc.TOO_LARGE, f"message over {rpc.MAX_MESSAGE} bytes")
                        )
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as e:
                self.service.metrics.task_failed("connection")
                log.error("connection-failed", pid=peer.pid, error=describe(e))

    @property
    def probes(self) -> dict[str, httpd.Route]:
        """kubelet's HTTP probes: alive while this loop answers; ready once float is made
        (before that, every registration would be refused as busy)."""

        def ready() -> tuple[int, str]:
            if self.service.layout.float_cpus() is None:
                return 503, "no float cgroup yet: kubelet's cpu_manager_state is unknown\n"
            return 200, "ready\n"

        return {
            "/healthz": lambda: (200, "ok\n"),
            "/readyz": ready,
            "/metrics": self.service.metrics.scrape,
        }

    async def serve_socket(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        """Serve on the socket; while the path still leads to it. One removed or replaced
        (by a hand, or by a pod that could write the directory) is bound again at once,
        logged; connections already open are served on in `handlers`."""
        while True:
            async with trio.open_nursery() as n:
                n.start_soon(
                    functools.partial(
                        trio.serve_listeners,
                        self.serve_connection,
                        [listener],
                        handler_nursery=handlers,
                    )
                )
                while (why := self.socket.changed()) is None:
                    await trio.sleep(SOCKET_CHECK)
                n.cancel_scope.cancel()
            await listener.aclose()
            log.warning("socket-lost", path=str(self.socket.path), reason=why)
            while True:
                try:
                    listener = await self.socket.bind(takeover=True)
                    break
                except SocketError as e:
                    log.error("socket-rebind-failed", error=str(e), retry_in=SOCKET_CHECK)
                    await trio.sleep(SOCKET_CHECK)
            log.warning("socket-rebound", path=str(self.socket.path))

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            if (signum := early.stop_requested()) is not None:
                log.info("controller-stopping", signal=signal.Signals(signum).name)
                return 0
            try:
                await self.service.setup()
                listener = await self.socket.bind()
            except (ControllerError, SocketError) as e:
                log.error("controller-failed", error=str(e))
                return 1
            try:
                async with trio.open_nursery() as nursery:
                    self.service.nursery = nursery
                    self.service.adopt_tenants()
                    failed = self.service.metrics.task_failed
                    nursery.start_soon(
                        guarded,
                        "follow",
                        "follow",
                        lambda: self.service.keeper.follow(
                            self.opts.resync_interval, self.service.lock
                        ),
                        failed,
                    )
                    nursery.start_soon(self.serve_socket, listener, nursery)
                    nursery.start_soon(
                        guarded,
                        "kernel-sweep",
                        "kernel-sweep",
                        lambda: self.service.sweep_kernel_threads(self.opts.resync_interval),
                        failed,
                    )
                    if self.opts.health_address:
                        try:
                            await nursery.start(httpd.serve, self.opts.health_address, self.probes)
                        except OSError as e:
                            log.error(
                                "controller-failed",
                                error=f"cannot serve HTTP on {self.opts.health_address}: "
                                f"{e.strerror or e}",
                            )
                            nursery.cancel_scope.cancel()
                            return 1
                    log.info("controller-serving", socket=self.opts.socket)
                    async for signum in sigs:
                        log.info("controller-stopping", signal=signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
            finally:
                with contextlib.suppress(OSError):
                    self.socket.remove()
        log.info("exit", code=0)
        return 0


def _count(cpu_set: frozenset[int] | None) -> int | None:
    return None if cpu_set is None else len(cpu_set)
