"""The controller's daemon: the Unix socket, the bound on connections, the serve loop, and
the float keeper's follow loop beside it. The handlers are in service.py."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
from pathlib import Path

import trio

from runner import early, httpd, rpc
from runner.controller.identity import Peer, identify
from runner.controller.metrics import Held
from runner.controller.service import ControllerError, ControllerOptions, Service
from runner.log import log

# A bound on open connections (memory), far above what a node's runners need at once. A
# slow caller cannot hold the cgroup lock (no sleeping under it), and idle ones are dropped.
MAX_CONNECTIONS = 1024


class Server:
    def __init__(self, opts: ControllerOptions) -> None:
        self.opts = opts
        self.service = Service(opts)
        self._open = 0
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
        # Who the caller is, once and at once: later, its pid may be someone else's.
        peer = identify(stream.socket)  # type: ignore[arg-type]
        if self._open >= MAX_CONNECTIONS:
            log.warning("connection-refused", pid=peer.pid, reason="too many open connections")
            await stream.aclose()
            return
        self._open += 1
        try:
            await self._serve(stream, peer)
        finally:
            self._open -= 1

    async def _serve(self, stream: trio.SocketStream, peer: Peer) -> None:
        reader = rpc.LineReader(stream)
        async with stream:
            try:
                while True:
                    # A silent client gets `idle_timeout`, then the door: it cannot hold a
                    # connection slot forever.
                    with trio.move_on_after(self.opts.idle_timeout) as idle:
                        line = await reader.readline()
                    if idle.cancelled_caught:
                        log.debug("connection-idle", pid=peer.pid)
                        return
                    if line is None:
                        return
                    response = await self.service.dispatch(peer, line)
                    if response is None:
                        continue
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
                log.error("connection-failed", pid=peer.pid, error=f"{type(e).__name__}: {e}")

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

    async def open_socket(self) -> trio.SocketListener:
        path = Path(self.opts.socket)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ControllerError(f"cannot create {path.parent}: {e.strerror}") from None
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ControllerError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise ControllerError(f"another controller is serving on {path}")
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise ControllerError(f"cannot probe {path}: {e.strerror}") from None
                path.unlink(missing_ok=True)  # left by a controller that died
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # the socket is born 0660: no window with a wider mode
        try:
            await sock.bind(str(path))
            sock.listen(512)
        except OSError as e:
            sock.close()
            hint = " (at most 107 bytes)" if len(str(path).encode()) > 107 else ""
            raise ControllerError(f"cannot serve on {path}: {e.strerror or e}{hint}") from None
        finally:
            os.umask(old)
        return trio.SocketListener(sock)

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            if (signum := early.stop_requested()) is not None:
                log.info("controller-stopping", signal=signal.Signals(signum).name)
                return 0
            try:
                await self.service.setup()
                listener = await self.open_socket()
            except ControllerError as e:
                log.error("controller-failed", error=str(e))
                return 1
            socket_ino = os.stat(self.opts.socket).st_ino
            try:
                async with trio.open_nursery() as nursery:
                    self.service.nursery = nursery
                    self.service.adopt_tenants()
                    nursery.start_soon(
                        self.service.keeper.follow, self.opts.resync_interval, self.service.lock
                    )
                    nursery.start_soon(trio.serve_listeners, self.serve_connection, [listener])
                    nursery.start_soon(self.service.sweep_kernel_threads, self.opts.resync_interval)
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
                    if os.stat(self.opts.socket).st_ino == socket_ino:
                        os.unlink(self.opts.socket)
        log.info("exit", code=0)
        return 0


def _count(cpu_set: frozenset[int] | None) -> int | None:
    return None if cpu_set is None else len(cpu_set)
