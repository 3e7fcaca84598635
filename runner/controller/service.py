"""The controller's state and handlers: the node's cgroup root set up, registrations under
one lock, and float kept by the shared float keeper.

Stateless by design: cgroupfs and cpu_manager_state are the truth, so a restart adopts what
is there and running instances are never touched.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from runner import cpus, rpc
from runner.controller import kthreads, network, policy
from runner.controller.identity import Peer
from runner.controller.metrics import ControllerMetrics
from runner.controller.tenants import Tenant, Tenants, keep
from runner.log import log
from runner.node import partition, podfloat, procfs
from runner.node.cgroupfs import CgroupError, CgroupFS, pressures
from runner.node.floatkeeper import FloatKeeper, FloatUnknown
from runner.node.kubelet import Unknown, read_state
from runner.node.layout import Layout, online_cpus, possible_cpus
from runner.node.partition import PartitionMode
from runner.node.podfloat import FloatLimits, RootLimits
from runner.topology import TopologyError, read_host

# A just-registered instance has no threads until its runner pins them. If kubelet lists the
# pod, its leaving cpu_manager_state says the pod is gone; if kubelet does not (no static
# policy), only time can tell the pinning window from a dead runner.
REGISTRATION_GRACE = 60.0


@attrs.frozen(kw_only=True)
class ControllerOptions:
    socket: str = "/run/instance-runner/controller.sock"
    cgroup_root: str = "/sys/fs/cgroup/instances"
    cgroup_mount: str = "/sys/fs/cgroup"
    kubelet_dir: str = "/var/lib/kubelet"
    idle_timeout: float = 10.0
    resync_interval: float = 10.0
    health_address: str | None = None  # HOST:PORT for kubelet's HTTP probes; None: off
    partition: PartitionMode = "none"  # isolated: instance CPUs as isolated partitions
    verify_interval: float = 1.0  # how often placed vCPUs are checked (0: never)
    max_rt_priority: int = 1  # the highest SCHED_FIFO priority a pod's vCPU may get
    # Each pod's bound in float (None: no cap), and the node-wide one on <root> (podfloat.py).
    pod_float_pids_max: int | None = podfloat.POD_PIDS_MAX
    pod_float_cpus: float | None = podfloat.POD_CPUS
    float_pids_max: int | None = None
    float_memory_max: int | None = None
    nft: str = "nft"  # for the pods' masquerade and bandwidth rules

    @property
    def pod_float(self) -> FloatLimits:
        return FloatLimits(self.pod_float_pids_max, self.pod_float_cpus)

    @property
    def root_limits(self) -> RootLimits:
        return RootLimits(self.float_pids_max, self.float_memory_max)


class ControllerError(Exception):
    """The controller cannot start; one line for the operator."""


class Service:
    def __init__(self, opts: ControllerOptions) -> None:
        self.opts = opts
        self.cg = CgroupFS(opts.cgroup_mount)
        self.lock = trio.Lock()  # cgroup writes: one at a time
        self.online: cpus.CpuSet = frozenset()
        self.possible: cpus.CpuSet = frozenset()
        self.float_bounds: tuple[str, ...] = ()  # controllers pods' parts of float get
        self.layout = Layout(self.cg, "/")
        self.metrics = ControllerMetrics()
        self.network = network.Maker(opts.nft)
        self.keeper = FloatKeeper(
            self.layout, opts.kubelet_dir, self._young, timed=self.metrics.reconcile.observe
        )
        self._registered_at: dict[str, float] = {}
        # Registered pods, by instance uuid.
        self.tenants = Tenants(self.cg, self.layout, opts.max_rt_priority, self._pod_float)
        self.own_ns = procfs.pid_namespace(os.getpid())
        self.nursery: trio.Nursery | None = None  # where pods' keepers run (the server's)
        self._kept: set[int] = set()  # kernel threads the kernel would not let go
        self.kernel_threads_moved = 0

    def _young(self) -> set[str]:
        now = time.monotonic()
        return {u for u, t in self._registered_at.items() if now - t < REGISTRATION_GRACE}

    async def setup(self) -> None:
        try:
            self.cg.check_v2_cpuset()
            root = self.cg.relative(self.opts.cgroup_root)
        except CgroupError as e:
            raise ControllerError(str(e)) from None
        except ValueError:
            raise ControllerError(
                f"--cgroup-root {self.opts.cgroup_root} is not below the "
                f"cgroup mount {self.opts.cgroup_mount}"
            ) from None
        self.layout = self.keeper.layout = self.tenants.layout = Layout(self.cg, root)
        self.online = online_cpus()
        self.possible = possible_cpus()
        try:
            host = read_host()
        except TopologyError as e:
            raise ControllerError(str(e)) from None
        mems = cpus.format(host.with_memory or host.mems_of(self.online) or {0})
        try:
            self.cg.make_domain_root(root)
            if self.cg.read(root, "cpuset.cpus").strip() != cpus.format(self.online):
                self.cg.set_cpus(root, self.online)
            self.cg.write(root, "cpuset.mems", mems)
            podfloat.bound_root(self.cg, self.layout, self.opts.root_limits)
            float_cpus: cpus.CpuSet | None = await self.keeper.resync("start")
        except FloatUnknown as e:
            float_cpus = None  # registrations wait until kubelet's state can be read
            log.warning("float-not-made", reason=str(e))
        except CgroupError as e:
            raise ControllerError(str(e)) from None
        except OSError as e:
            raise ControllerError(f"cannot set up {self.opts.cgroup_root}: {e}") from None
        if float_cpus is not None:
            # Threads already in float (adopted instances' helpers) get what it has now.
            self.cg.spread_threads(self.layout.float, float_cpus)
            self.float_bounds = podfloat.enable(self.cg, self.layout)
        log.info(
            "topology-ready",
            root=root,
            cpus=cpus.format(self.online),
            mems=mems,
            float=cpus.format(float_cpus) if float_cpus is not None else None,
            adopted=sorted(self.layout.instances()),
        )

    # --- handlers ------------------------------------------------------------------------------

    async def register(self, peer: Peer, p: rpc.RegisterParams) -> rpc.RegisterResult:
        container: cpus.CpuSet | None = None
        if peer.pod is not None:
            with contextlib.suppress(CgroupError):
                container = self.cg.cpus(peer.pod.path, effective=False)
        state = read_state(self.opts.kubelet_dir)
        wanted = policy.may_register(
            peer.pod, p.uuid, p.cpuset, container, self.online, state, peer.hidden, self.possible
        )
        path = self.layout.instance(p.uuid)
        async with self.lock:
            live = {u: i.cpus for u, i in self.layout.instances().items()}
            if policy.may_take(p.uuid, wanted, live):
                self._book(peer, p.uuid)  # the same pod again: what it says now
                try:
                    self._pod_float(p.uuid)
                except CgroupError as e:
                    raise rpc.RPCError(rpc.INTERNAL_ERROR, str(e)) from None
                return self._registered(peer, p.uuid)
            have = self.layout.float_cpus()
            if have is None:
                raise rpc.RPCError(
                    rpc.BUSY, "no float cgroup yet: kubelet's cpu_manager_state is unknown"
                )
            try:
                if have & wanted:
                    # Shrink float first, so instance and float never share a CPU.
                    if not have - wanted:
                        raise rpc.RPCError(rpc.FORBIDDEN, "no shared CPU would be left")
                    self.keeper.apply(have, have - wanted, f"register {p.uuid}")
                self.cg.make_threaded(path, wanted, read_host().mems_of(wanted))
                self._pod_float(p.uuid)
                if self.opts.partition == "isolated":
                    partition.isolate_or_warn(self.cg, self.layout.root, path, wanted)
            except (CgroupError, TopologyError, partition.PartitionError) as e:
                with contextlib.suppress(OSError):
                    self.cg.dir(path).rmdir()
                raise rpc.RPCError(rpc.INTERNAL_ERROR, str(e)) from None
            if isinstance(state, Unknown) or not state.entries.get(p.uuid):
                self._registered_at[p.uuid] = time.monotonic()
            self._book(peer, p.uuid)
        log.info("instance-registered", uuid=p.uuid, cpuset=cpus.format(wanted), cgroup=path)
        self.keeper.poke()
        return self._registered(peer, p.uuid)

    def _pod_float(self, uuid: str) -> str:
        """The pod's part of float, bounded (podfloat.py); made before anything of the pod
        can be moved there."""
        if not self.float_bounds:
            self.float_bounds = podfloat.enable(self.cg, self.layout)
        return podfloat.make(self.cg, self.layout, uuid, self.opts.pod_float)

    def _book(self, peer: Peer, uuid: str) -> None:
        if peer.pod is None or peer.pid is None or peer.pidns is None:
            return
        try:
            self.tenants.book(uuid, peer.pod.path, peer.pid, peer.pidns)
        except OSError:
            # Gone, or its PID taken by a process of another namespace: not this pod's.
            self.tenants.forget(uuid)
            raise rpc.RPCError(
                rpc.FORBIDDEN, "the caller went away during its registration"
            ) from None

    def _registered(self, peer: Peer, uuid: str) -> rpc.RegisterResult:
        have = self.layout.float_cpus()
        return rpc.RegisterResult(
            self.layout.instance(uuid),
            self.layout.float_of(uuid),
            peer.pod.path if peer.pod is not None else "",
            cpus.format(have) if have is not None else "",
        )

    async def deregister(self, peer: Peer, p: rpc.DeregisterParams) -> rpc.DeregisterResult:
        policy.check_caller(peer.pod, p.uuid, peer.hidden)
        path = self.layout.instance(p.uuid)
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
                partition.undo(self.cg, self.layout.root, path)  # whatever made it
                await self.cg.remove(path, attempts=5, delay=0.05)
            except partition.PartitionError as e:
                raise rpc.RPCError(rpc.INTERNAL_ERROR, str(e)) from None
            except CgroupError as e:
                raise rpc.RPCError(
                    rpc.BUSY, f"instance {p.uuid} still holds threads: {e}"
                ) from None
            self._registered_at.pop(p.uuid, None)
            self.tenants.forget(p.uuid)
            # What the pod swept there ends with its PID namespace: until then it stays, and
            # the float keeper removes it once it is empty.
            await podfloat.remove(self.cg, self.layout.float_of(p.uuid))
        log.info("instance-deregistered", uuid=p.uuid)
        self.keeper.poke()
        return rpc.DeregisterResult(True)

    async def sweep_kernel_threads(self, interval: float) -> None:
        """KVM's workers out of every registered pod's container cgroup (kthreads.py); and
        tenants whose instance was removed as stale forgotten."""
        while True:
            await trio.sleep(interval)
            async with self.lock:
                for uuid, tenant in list(self.tenants.by_uuid.items()):
                    if not self.cg.exists(self.layout.instance(uuid)):
                        self.tenants.forget(uuid)  # removed as stale
                        continue
                    try:
                        self.kernel_threads_moved += kthreads.sweep(
                            self.cg, self.layout, uuid, tenant.container, self._kept
                        )
                    except Exception as e:  # a bad moment in /proc must not stop the daemon
                        log.error(
                            "kernel-sweep-failed", uuid=uuid, error=f"{type(e).__name__}: {e}"
                        )

    def _tenant(self, peer: Peer, uuid: str) -> Tenant:
        ns = policy.check_tenant(
            uuid,
            peer.pidns,
            {u: t.ns for u, t in self.tenants.by_uuid.items() if t.ns},
            self.own_ns,
            peer.hidden,
        )
        tenant = self.tenants.by_uuid[uuid]
        assert tenant.ns == ns
        return tenant

    def adopt_tenants(self) -> None:
        """A restarted controller keeps the running instances' vCPUs placed again."""
        assert self.nursery is not None
        for tenant, keeper, pidfd in self.tenants.adopt(self.layout.instances()):
            self.nursery.start_soon(
                keep, tenant, keeper, pidfd, self.opts.verify_interval, self.metrics.task_failed
            )

    async def move_process(self, peer: Peer, p: rpc.MoveParams) -> rpc.MoveResult:
        policy.check_pid(p.pid)
        async with self.lock:
            self.tenants.move(self._tenant(peer, p.uuid), p.pid, p.to)
        return rpc.MoveResult(True)

    async def place_vcpus(self, peer: Peer, p: rpc.PlaceParams) -> rpc.PlaceResult:
        policy.check_pid(p.qemu)
        policy.check_pid(p.anchor)
        async with self.lock:
            tenant = self._tenant(peer, p.uuid)
            instance = self.layout.instances().get(p.uuid)
            if instance is None:
                raise rpc.RPCError(rpc.FORBIDDEN, f"pod {p.uuid} has no instance cgroup")
            policy.check_placement(p.vcpus, instance.cpus, self._realtime())
            if tenant.keeper is not None:
                raise rpc.RPCError(rpc.CONFLICT, f"pod {p.uuid}'s vCPUs are placed already")
            keeper, pidfd = self.tenants.place(tenant, p, instance.path)
            tenant.keeper = keeper
            assert self.nursery is not None
            self.nursery.start_soon(
                keep, tenant, keeper, pidfd, self.opts.verify_interval, self.metrics.task_failed
            )
        return rpc.PlaceResult(len(p.vcpus))

    async def make_network(self, peer: Peer, p: rpc.NetworkParams) -> rpc.NetworkResult:
        """Not under the cgroup lock: it touches no cgroup, and takes up to seconds."""
        return await self.network.make(peer, self._tenant(peer, p.uuid).ns, p)

    async def unmake_network(
        self, peer: Peer, p: rpc.UnmakeNetworkParams
    ) -> rpc.UnmakeNetworkResult:
        return await self.network.unmake(peer, self._tenant(peer, p.uuid).ns, p)

    def _realtime(self) -> policy.Realtime:
        try:
            throttling: tuple[int, int] | None = procfs.rt_throttling()
        except (OSError, ValueError):
            throttling = None
        return policy.Realtime(self.opts.max_rt_priority, throttling)

    async def instance_status(self, peer: Peer, p: rpc.StatusParams) -> rpc.StatusResult:
        """Read for a runner that cannot read the node's cgroupfs itself."""
        tenant = self._tenant(peer, p.uuid)
        k = tenant.keeper
        return rpc.StatusResult(
            # float is the pod's own part of it: float's whole pressure is other pods' doing.
            pressures(
                self.cg,
                {"instance": self.layout.instance(p.uuid), "float": self.layout.float_of(p.uuid)},
            ),
            k.counts() if k else None,
        )

    def caller_key(self, peer: Peer) -> str | None:
        """Whose budget of connections a caller spends: its pod's (by UID while in a
        container cgroup, else by PID namespace, which every process of the pod's container
        shares); one budget for every caller that cannot be proven; None (the node-wide cap
        alone) for the node itself."""
        if self._on_node(peer):
            return None
        if peer.pod is not None:
            return f"pod {peer.pod.pod_uid}"
        return f"pidns {peer.pidns}" if peer.pidns is not None else "unproven"

    def _on_node(self, peer: Peer) -> bool:
        return peer.on_node(self.own_ns, self.layout.root)

    async def list_instances(self, peer: Peer, _p: object) -> rpc.ListResult:
        policy.check_node(self._on_node(peer), "listInstances")
        return rpc.ListResult(
            [
                rpc.InstanceInfo(i.uuid, i.path, cpus.format(i.cpus), i.threads)
                for i in sorted(self.layout.instances().values(), key=lambda i: i.uuid)
            ]
        )

    async def health(self, peer: Peer, _p: object) -> rpc.HealthResult:
        float_cpus = self.layout.float_cpus()
        status = "ok" if float_cpus is not None else "no-float"
        if not self._on_node(peer):
            return rpc.HealthResult(status)
        return rpc.HealthResult(
            status, cpus.format(float_cpus or frozenset()), len(self.layout.instances())
        )

    async def dispatch(self, peer: Peer, line: bytes) -> rpc.Response | None:
        req = rpc.decode_request(line)
        if isinstance(req, rpc.Response):
            # Never labelled by what a caller sent: a method name would be its to choose.
            self.metrics.answered("-", req.error.code if req.error else None)
            return req
        if isinstance(req, rpc.Notification):
            log.warning(
                "notification-ignored", method=req.method, pid=peer.pid, detail="connection closed"
            )
            return None
        handlers: dict[str, Callable[[Peer, Any], Awaitable[object]]] = {
            "registerCgroup": self.register,
            "deregisterCgroup": self.deregister,
            "moveProcess": self.move_process,
            "placeVcpus": self.place_vcpus,
            "instanceStatus": self.instance_status,
            "makeNetwork": self.make_network,
            "unmakeNetwork": self.unmake_network,
            "listInstances": self.list_instances,
            "health": self.health,
        }
        try:
            result = await handlers[req.method](peer, req.params)
        except rpc.RPCError as e:
            log.warning(
                "request-refused",
                method=req.method,
                pid=peer.pid,
                peer=peer.how,
                error=rpc.trim(e.message),  # it may quote what the caller sent
            )
            self.metrics.answered(req.method, e.code)
            return rpc.error(req.id, e.code, e.message)
        except Exception as e:  # a handler bug answers this request, never kills the daemon
            log.error("request-failed", method=req.method, error=f"{type(e).__name__}: {e}")
            self.metrics.answered(req.method, rpc.INTERNAL_ERROR)
            return rpc.error(req.id, rpc.INTERNAL_ERROR, "internal error")
        self.metrics.answered(req.method, None)
        return rpc.Response(req.id, result=result)
