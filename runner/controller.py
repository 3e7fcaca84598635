"""The node controller: owns <root>/float and <root>/instance-<pod uid>, answers runners over
JSON-RPC on a Unix socket, and keeps float equal to kubelet's shared CPUs.

Stateless by design: cgroupfs and cpu_manager_state are the truth, so a restart adopts what
is there and running instances are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from runner import cpus, kube, rpc
from runner.cgroups import CgroupError, CgroupFS
from runner.cpus import CpuSet
from runner.inotify import watch_kubelet_state
from runner.log import log

STATE_FILE = "cpu_manager_state"
# A just-registered instance has no threads until its runner pins them. If kubelet lists the
# pod, its leaving cpu_manager_state says the pod is gone; if kubelet does not (no static
# policy), only time can tell the pinning window from a dead runner.
REGISTRATION_GRACE = 60.0
# A bound on open connections (memory), far above what a node's runners need at once. A
# slow caller cannot hold the cgroup lock (no sleeping under it), and idle ones are dropped.
MAX_CONNECTIONS = 1024


@attrs.frozen(kw_only=True)
class ControllerOptions:
    socket: str = "/run/instance-runner/controller.sock"
    cgroup_root: str = "/sys/fs/cgroup/instances"
    cgroup_mount: str = "/sys/fs/cgroup"
    kubelet_dir: str = "/var/lib/kubelet"
    idle_timeout: float = 10.0
    resync_interval: float = 10.0


class ControllerError(Exception):
    """The controller cannot start; one line for the operator."""


@attrs.frozen
class Instance:
    uuid: str
    path: str
    cpus: CpuSet
    threads: int


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def caller_pod(pid: int) -> kube.PodCgroup | None:
    """The pod a process belongs to, from its cgroup; None outside any pod (or if gone)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
        return kube.parse_pod_cgroup(kube.own_cgroup_path(None, text))
    except (OSError, kube.KubeError):
        return None


def numa_nodes_of(cpu_set: CpuSet) -> CpuSet:
    nodes: set[int] = set()
    base = Path("/sys/devices/system/node")
    for node in base.glob("node[0-9]*"):
        if cpus.parse((node / "cpulist").read_text()) & cpu_set:
            nodes.add(int(node.name[4:]))
    return frozenset(nodes) or frozenset({0})


class Controller:
    def __init__(self, opts: ControllerOptions) -> None:
        self.opts = opts
        self.cg = CgroupFS(opts.cgroup_mount)
        self.lock = trio.Lock()  # cgroup writes: one at a time
        self.online: CpuSet = frozenset()
        self.root = ""
        self.float = ""
        self._wake = trio.Event()
        self._registered_at: dict[str, float] = {}
        self._open = 0  # open connections

    # --- topology ------------------------------------------------------------------------------

    def setup(self) -> None:
        try:
            self.cg.check_v2_cpuset()
            self.root = self.cg.relative(self.opts.cgroup_root)
        except CgroupError as e:
            raise ControllerError(str(e)) from None
        except ValueError:
            raise ControllerError(
                f"--cgroup-root {self.opts.cgroup_root} is not below the "
                f"cgroup mount {self.opts.cgroup_mount}"
            ) from None
        self.float = f"{self.root}/float"
        self.online = cpus.parse(Path("/sys/devices/system/cpu/online").read_text())
        mems = cpus.format(numa_nodes_of(self.online))
        try:
            self.cg.make_domain_root(self.root)
            if self.cg.read(self.root, "cpuset.cpus").strip() != cpus.format(self.online):
                self.cg.set_cpus(self.root, self.online)
            self.cg.write(self.root, "cpuset.mems", mems)
            instances = self.instances()
            live = frozenset().union(*(i.cpus for i in instances.values()))
            want = self._float_target(self._kubelet_state(), live)
            self.cg.make_threaded(self.float, want or self.online - live)
        except CgroupError as e:
            raise ControllerError(str(e)) from None
        except OSError as e:
            raise ControllerError(f"cannot set up {self.opts.cgroup_root}: {e}") from None
        log.info(
            "topology-ready",
            root=self.root,
            cpus=cpus.format(self.online),
            mems=mems,
            float=cpus.format(self.cg.cpus(self.float, effective=False)),
            adopted=sorted(instances),
        )

    def instances(self) -> dict[str, Instance]:
        found = {}
        for path in self.cg.children(self.root):
            name = path.rsplit("/", 1)[1]
            if not name.startswith("instance-"):
                continue
            uuid = name.removeprefix("instance-")
            try:
                found[uuid] = Instance(
                    uuid, path, self.cg.cpus(path, effective=False), len(self.cg.threads(path))
                )
            except (CgroupError, cpus.CpuListError):
                continue  # removed under us
        return found

    def _kubelet_state(self) -> kube.KubeletState | bool | None:
        """The state; None when absent; False when unreadable (keep what we have)."""
        try:
            text = (Path(self.opts.kubelet_dir) / STATE_FILE).read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("kubelet-state-unreadable", error=e.strerror)
            return False
        try:
            return kube.parse_cpu_manager_state(text)
        except kube.KubeError as e:
            log.error("kubelet-state-unreadable", error=str(e))
            return False

    def _float_target(self, state: kube.KubeletState | bool | None, live: CpuSet) -> CpuSet:
        if isinstance(state, kube.KubeletState) and state.default_cpus:
            base = state.default_cpus & self.online
        else:
            base = self.online
        return base - live  # instance CPUs and float CPUs never overlap

    # --- reconcile -----------------------------------------------------------------------------

    def poke(self) -> None:
        self._wake.set()

    async def reconcile(self, reason: str) -> None:
        async with self.lock:
            state = self._kubelet_state()
            instances = self.instances()
            if isinstance(state, kube.KubeletState):
                # Stale instances first: their CPUs go back to float in this same pass.
                now = time.monotonic()
                for inst in list(instances.values()):
                    young = now - self._registered_at.get(inst.uuid, -1e9) < REGISTRATION_GRACE
                    if inst.uuid in state.entries or inst.threads or young:
                        continue
                    try:
                        await self.cg.remove(inst.path, attempts=3, delay=0.1)
                    except CgroupError as e:
                        log.warning("stale-instance-kept", uuid=inst.uuid, error=str(e))
                        continue
                    del instances[inst.uuid]
                    self._registered_at.pop(inst.uuid, None)
                    log.info(
                        "instance-removed",
                        uuid=inst.uuid,
                        reason="stale: pod gone from cpu_manager_state and no thread left",
                    )
            if state is False:
                return  # unreadable state: keep float as it is
            live = frozenset().union(*(i.cpus for i in instances.values()))
            want = self._float_target(state, live)
            have = self.cg.cpus(self.float, effective=False)
            if not want:
                log.warning(
                    "float-unchanged", reason="no shared CPU would be left", cpus=cpus.format(have)
                )
            elif want != have:
                self.cg.set_cpus(self.float, want)
                self.cg.spread_threads(self.float, want)
                log.info("float-cpus", old=cpus.format(have), new=cpus.format(want), reason=reason)

    async def reconcile_loop(self) -> None:
        while True:
            with trio.move_on_after(self.opts.resync_interval):
                await self._wake.wait()
            reason = "event" if self._wake.is_set() else "periodic"
            self._wake = trio.Event()
            try:
                await self.reconcile(reason)
            except Exception as e:  # a bad moment in cgroupfs must not stop the loop
                log.error("reconcile-failed", error=f"{type(e).__name__}: {e}")

    # --- RPC -----------------------------------------------------------------------------------

    def _authorise(self, pid: int | None, uuid: str) -> kube.PodCgroup:
        if kube.normalise_uid(uuid) != uuid:
            raise rpc.RPCError(
                rpc.INVALID_PARAMS, f"invalid params: uuid {uuid!r} is not a pod UID"
            )
        pod = caller_pod(pid) if pid else None
        if pod is None:
            raise rpc.RPCError(
                rpc.FORBIDDEN,
                "the caller is not in a pod's container cgroup "
                "(register before leaving it, deregister after returning)",
            )
        if pod.pod_uid != uuid:
            raise rpc.RPCError(rpc.FORBIDDEN, f"pod {pod.pod_uid} may not act for pod {uuid}")
        return pod

    async def register(self, pid: int | None, p: rpc.RegisterParams) -> rpc.RegisterResult:
        pod = self._authorise(pid, p.uuid)
        try:
            wanted = cpus.parse(p.cpuset)
        except cpus.CpuListError as e:
            raise rpc.RPCError(rpc.INVALID_PARAMS, f"invalid params: {e}") from None
        if not wanted:
            raise rpc.RPCError(rpc.INVALID_PARAMS, "invalid params: cpuset is empty")
        if wanted - self.online:
            raise rpc.RPCError(
                rpc.FORBIDDEN, f"CPUs {cpus.format(wanted - self.online)} are not on this node"
            )
        try:
            container = self.cg.cpus(pod.path, effective=False)
        except CgroupError:
            raise rpc.RPCError(rpc.FORBIDDEN, "the caller's container cgroup is gone") from None
        if wanted != container:
            raise rpc.RPCError(
                rpc.FORBIDDEN,
                f"cpuset {cpus.format(wanted)} is not the pod's ({cpus.format(container)})",
            )
        state = self._kubelet_state()
        if isinstance(state, kube.KubeletState):
            allocated = state.pod_cpus(p.uuid)
            # Under the static policy only kubelet hands out exclusive CPUs: no entry, no claim.
            exclusive = state.policy == "static"
            if (exclusive or allocated) and allocated != wanted:
                raise rpc.RPCError(
                    rpc.FORBIDDEN,
                    f"cpuset {cpus.format(wanted)} is not the "
                    f"pod's exclusive allocation ({cpus.format(allocated)})",
                )
            if state.default_cpus & wanted:
                raise rpc.RPCError(
                    rpc.FORBIDDEN,
                    f"CPUs {cpus.format(state.default_cpus & wanted)} are kubelet's shared CPUs",
                )
        path = f"{self.root}/instance-{p.uuid}"
        async with self.lock:
            instances = self.instances()
            mine = instances.pop(p.uuid, None)
            if mine is not None:
                if mine.cpus != wanted:
                    raise rpc.RPCError(
                        rpc.CONFLICT,
                        f"instance {p.uuid} is live with cpuset {cpus.format(mine.cpus)}",
                    )
                return rpc.RegisterResult(path, self.float)
            clash = {u: i.cpus & wanted for u, i in instances.items() if i.cpus & wanted}
            if clash:
                raise rpc.RPCError(
                    rpc.CONFLICT, "CPUs already held by instance(s) " + ", ".join(sorted(clash))
                )
            try:
                have = self.cg.cpus(self.float, effective=False)
                if have & wanted:
                    # Shrink float first, so instance and float never share a CPU.
                    if not have - wanted:
                        raise rpc.RPCError(rpc.FORBIDDEN, "no shared CPU would be left")
                    self.cg.set_cpus(self.float, have - wanted)
                    log.info(
                        "float-cpus",
                        old=cpus.format(have),
                        new=cpus.format(have - wanted),
                        reason=f"register {p.uuid}",
                    )
                self.cg.make_threaded(path, wanted)
                self.cg.write(path, "cpuset.mems", cpus.format(numa_nodes_of(wanted)))
            except CgroupError as e:
                with contextlib.suppress(OSError):
                    self.cg.dir(path).rmdir()
                raise rpc.RPCError(rpc.INTERNAL_ERROR, str(e)) from None
            if not (isinstance(state, kube.KubeletState) and state.pod_cpus(p.uuid)):
                self._registered_at[p.uuid] = time.monotonic()
        log.info("instance-registered", uuid=p.uuid, cpuset=cpus.format(wanted), cgroup=path)
        self.poke()
        return rpc.RegisterResult(path, self.float)

    async def deregister(self, pid: int | None, p: rpc.DeregisterParams) -> rpc.DeregisterResult:
        self._authorise(pid, p.uuid)
        path = f"{self.root}/instance-{p.uuid}"
        async with self.lock:
            if not self.cg.exists(path):
                return rpc.DeregisterResult(False)
            try:
                threads = len(self.cg.threads(path))
            except CgroupError:
                threads = 0  # removed under us: rmdir below settles it
            if threads:
                # Answer now: sleeping here would hold every other caller behind the lock.
                raise rpc.RPCError(rpc.BUSY, f"instance {p.uuid} still holds {threads} threads")
            try:
                await self.cg.remove(path, attempts=5, delay=0.05)
            except CgroupError as e:
                raise rpc.RPCError(
                    rpc.BUSY, f"instance {p.uuid} still holds threads: {e}"
                ) from None
            self._registered_at.pop(p.uuid, None)
        log.info("instance-deregistered", uuid=p.uuid)
        self.poke()
        return rpc.DeregisterResult(True)

    async def list_instances(self, _pid: int | None, _p: object) -> rpc.ListResult:
        return rpc.ListResult(
            [
                rpc.InstanceInfo(i.uuid, i.path, cpus.format(i.cpus), i.threads)
                for i in sorted(self.instances().values(), key=lambda i: i.uuid)
            ]
        )

    async def health(self, _pid: int | None, _p: object) -> rpc.HealthResult:
        return rpc.HealthResult(
            "ok", cpus.format(self.cg.cpus(self.float, effective=False)), len(self.instances())
        )

    async def dispatch(self, pid: int | None, line: bytes) -> rpc.Response | None:
        req = rpc.decode_request(line)
        if isinstance(req, rpc.Response):
            return req
        if isinstance(req, rpc.Notification):
            log.warning("notification-ignored", method=req.method, pid=pid)
            return None
        handlers: dict[str, Callable[[int | None, Any], Awaitable[object]]] = {
            "registerCgroup": self.register,
            "deregisterCgroup": self.deregister,
            "listInstances": self.list_instances,
            "health": self.health,
        }
        try:
            return rpc.Response(req.id, result=await handlers[req.method](pid, req.params))
        except rpc.RPCError as e:
            log.warning("request-refused", method=req.method, pid=pid, error=e.message)
            return rpc.error(req.id, e.code, e.message)
        except Exception as e:  # a handler bug answers this request, never kills the daemon
            log.error("request-failed", method=req.method, error=f"{type(e).__name__}: {e}")
            return rpc.error(req.id, rpc.INTERNAL_ERROR, "internal error")

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            pid: int | None = peer_pid(stream.socket)  # type: ignore[arg-type]
        except OSError:
            pid = None
        if self._open >= MAX_CONNECTIONS:
            log.warning("connection-refused", pid=pid, reason="too many open connections")
            await stream.aclose()
            return
        self._open += 1
        try:
            await self._serve(stream, pid)
        finally:
            self._open -= 1

    async def _serve(self, stream: trio.SocketStream, pid: int | None) -> None:
        reader = rpc.LineReader(stream)
        async with stream:
            try:
                while True:
                    # A silent client gets `idle_timeout`, then the door: it cannot hold a
                    # connection slot forever.
                    with trio.move_on_after(self.opts.idle_timeout) as idle:
                        line = await reader.readline()
                    if idle.cancelled_caught:
                        log.debug("connection-idle", pid=pid)
                        return
                    if line is None:
                        return
                    response = await self.dispatch(pid, line)
                    if response is None:
                        continue
                    with trio.move_on_after(self.opts.idle_timeout) as sending:
                        await stream.send_all(rpc.encode_response(response))
                    if sending.cancelled_caught:
                        log.debug("connection-stalled", pid=pid)
                        return  # half a response is on the wire: this stream is done
            except ValueError:
                log.warning("message-too-large", pid=pid, limit=rpc.MAX_MESSAGE)
                with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(
                        rpc.encode_response(
                            rpc.error(None, rpc.TOO_LARGE, f"message over {rpc.MAX_MESSAGE} bytes")
                        )
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as e:
                log.error("connection-failed", pid=pid, error=f"{type(e).__name__}: {e}")

    # --- the daemon ----------------------------------------------------------------------------

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
            try:
                self.setup()
                listener = await self.open_socket()
            except ControllerError as e:
                log.error("controller-failed", error=str(e))
                return 1
            socket_ino = os.stat(self.opts.socket).st_ino
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.reconcile_loop)
                    nursery.start_soon(
                        watch_kubelet_state,
                        self.opts.kubelet_dir,
                        self.poke,
                        self.opts.resync_interval,
                    )
                    nursery.start_soon(trio.serve_listeners, self.serve_connection, [listener])
                    self.poke()
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
