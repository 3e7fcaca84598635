"""Where the float and instance cgroups come from: made by the runner itself (embedded mode)
or handed out by the node controller. One interface, one class per mode:

- `shared_cpus()`: the node's shared CPUs, for the plan to check against (None when the
  controller checks them);
- `obtain(plan)`: the cgroups, ready for threads;
- `maintain()`: runs beside the guest (embedded mode keeps float for the node);
- `release()`: gives the instance cgroup back (safe to call when obtain failed half-way);
- the writes that move the pod's processes and threads: `enter_float`, `leave_float`,
  `join_container` and `place`. Embedded, the runner makes them itself (it is privileged). In
  controller mode the pod is unprivileged: the controller makes them, checks that each process
  is the pod's own, and keeps the vCPUs placed (`keeps` is False).
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

from runner import cpus, kube, rpc
from runner.cpus import CpuSet
from runner.log import log
from runner.node import partition, podfloat, procfs
from runner.node.cgroupfs import CgroupError, CgroupFS
from runner.node.floatkeeper import FloatKeeper, FloatUnknown, float_target
from runner.node.kubelet import Unknown, read_state
from runner.node.layout import Layout, held_cpus, online_cpus
from runner.node.pinning import PinError, place_vcpu
from runner.plan import Placed, Plan
from runner.run.options import StartupError

# Embedded mode re-reads kubelet's state on every change, and at least this often.
KUBELET_RESYNC = 10.0
# A scrape waits this long for what the controller reads for us, then answers without it.
STATUS_DEADLINE = 2.0


@attrs.frozen
class Cgroups:
    """The paths as the runner sees them; `ns_root` is the node's path of its cgroup
    namespace's root ("/" unless the container has a private one)."""

    float: str
    instance: str
    float_cpus: CpuSet
    ns_root: str = "/"


class CgroupSource(Protocol):
    keeps: bool  # True: the runner keeps its vCPUs placed; False: the controller does

    def shared_cpus(self) -> CpuSet | None: ...

    async def obtain(self, plan: Plan) -> Cgroups: ...

    async def maintain(self) -> None: ...

    async def release(self) -> None: ...

    async def enter_float(self, pid: int) -> None: ...

    async def leave_float(self, pid: int) -> None: ...

    async def join_container(self, pid: int) -> None: ...

    async def place(self, qemu: int, placed: list[Placed], anchor: int) -> None: ...

    async def status(self) -> rpc.StatusResult | None:
        """What the runner cannot read itself (None: it can, or nobody answered)."""
        ...


class Embedded:
    """float and the instance cgroup made by the runner; every runner keeps float for all."""

    keeps = True

    def __init__(
        self,
        cg: CgroupFS,
        root: str,
        kubelet_dir: str,
        uuid: str,
        container: str,
        mode: partition.PartitionMode = "none",
    ) -> None:
        self.cg = cg
        self.container = container  # the pod's container cgroup: the anchor's and QEMU's
        self.layout = Layout(cg, root)
        self.keeper = FloatKeeper(self.layout, kubelet_dir)
        self.kubelet_dir = kubelet_dir
        self.uuid = uuid
        self.partition = mode
        self._made: str | None = None
        self._isolated = False
        self.float = self.layout.float_of(uuid)  # this pod's part of float (podfloat.py)

    def shared_cpus(self) -> CpuSet:
        state = read_state(self.kubelet_dir)
        if isinstance(state, Unknown):
            raise StartupError(
                f"cannot tell the node's shared CPUs: {state.reason} (kubelet writes it "
                "under every CPU manager policy; the runner will not guess)"
            )
        try:
            kube.check_static(state)
        except kube.KubeError as e:
            raise StartupError(str(e)) from None
        others = {u: i for u, i in self.layout.instances().items() if u != self.uuid}
        shared = float_target(state, online_cpus(), held_cpus(others), None)
        return shared or frozenset()

    async def obtain(self, plan: Plan) -> Cgroups:
        own = frozenset(plan.instance_cpus)
        instance = self.layout.instance(self.uuid)
        try:
            self.cg.make_domain_root(self.layout.root)
            float_cpus = await self.keeper.resync("start", held=own)
            self.cg.spread_threads(self.layout.float, float_cpus)
            if self.cg.exists(instance) and self.cg.threads(instance):
                raise StartupError(
                    f"instance cgroup {instance} is already in use by another runner"
                )
            self._made = instance  # ours from here on, even if the next writes fail
            self.cg.make_threaded(instance, own, plan.mems)
            podfloat.enable(self.cg, self.layout)
            self.float = podfloat.make(self.cg, self.layout, self.uuid, podfloat.FloatLimits())
            if self.partition == "isolated":
                self._isolated = partition.isolate_or_warn(self.cg, self.layout.root, instance, own)
        except FloatUnknown as e:
            raise StartupError(f"cannot make the float cgroup: {e}") from None
        except CgroupError as e:
            raise StartupError(str(e)) from None
        except partition.PartitionError as e:
            raise StartupError(
                f"cannot make the instance CPUs an isolated partition: {e}"
            ) from None
        return Cgroups(self.float, instance, float_cpus)

    async def maintain(self) -> None:
        await self.keeper.follow(KUBELET_RESYNC)

    async def release(self) -> None:
        if self._made is None:
            return
        if self._isolated:
            # Before the rmdir, so <root> gives the CPUs back to the root partition.
            try:
                partition.undo(self.cg, self.layout.root, self._made)
            except (partition.PartitionError, CgroupError) as e:
                log.error("partition-undo-failed", cgroup=self._made, error=str(e))
            else:
                log.info("partition-undone", cgroup=self._made)
        await self.cg.remove(self._made)
        await podfloat.remove(self.cg, self.float, attempts=10)  # else the float keeper

    async def enter_float(self, pid: int) -> None:
        self.cg.move_process(self.float, pid)

    async def leave_float(self, pid: int) -> None:
        self.cg.move_process(self.container, pid)

    async def join_container(self, pid: int) -> None:
        self.cg.move_process(self.container, pid)

    async def place(self, qemu: int, placed: list[Placed], anchor: int) -> None:
        assert self._made is not None
        self.cg.move_process(self.float, qemu)  # its RAM is allocated by now
        for p in placed:
            place_vcpu(self.cg, self._made, self.float, qemu, p)

    async def status(self) -> None:
        return None  # the runner reads and keeps everything itself


class FromController:
    """float and the instance cgroup from the node controller, which makes every write for
    us: the pod needs no privilege. It knows us by our cgroup at registration, so we must be
    in the container cgroup then (and at deregistration, after moving back); in between, by
    our PID namespace."""

    keeps = False

    # Refusals that no retry will change.
    FINAL = (rpc.INVALID_PARAMS, rpc.FORBIDDEN, rpc.CONFLICT, rpc.METHOD_NOT_FOUND)

    def __init__(
        self, socket_path: str, timeout: float, uuid: str, cg: CgroupFS, container: str
    ) -> None:
        self.socket = socket_path
        self.timeout = timeout
        self.uuid = uuid
        self.cg = cg
        self.container = container
        self.asked = False  # a registration may have happened, even if its answer was lost
        self.status_failing = False  # logged once, not at every scrape

    def shared_cpus(self) -> None:
        return None  # the controller checks the CPUs against kubelet's state itself

    async def obtain(self, plan: Plan) -> Cgroups:
        params = rpc.RegisterParams(self.uuid, cpus.format(plan.instance_cpus))
        delay, attempt, last = 0.1, 0, ""
        with trio.move_on_after(self.timeout):
            while True:
                attempt += 1
                try:
                    res: rpc.RegisterResult = await rpc.call(
                        self.socket,
                        "registerCgroup",
                        params,
                        rpc.RegisterResult,
                        timeout=min(10, self.timeout),
                    )
                    self.asked = True
                    log.info("registered", controller=self.socket, attempts=attempt)
                    return self._cgroups(res)
                except rpc.RPCError as e:
                    self.asked = True
                    if e.code in self.FINAL:
                        raise StartupError(
                            f"the controller refused registration: {e.message}"
                        ) from None
                    last = e.message
                except (OSError, trio.TooSlowError) as e:
                    # No connection: nothing was asked. Anything later: it may have been.
                    self.asked = self.asked or not isinstance(e, rpc.ConnectError)
                    last = str(e) or type(e).__name__
                log.info("controller-retry", attempt=attempt, error=last, delay=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise StartupError(
            f"no answer from the controller at {self.socket} within {self.timeout:g} s: {last}"
        )

    def _cgroups(self, res: rpc.RegisterResult) -> Cgroups:
        """The paths as we see them: in a private cgroup namespace (our container cgroup is
        "/"), relative to the container cgroup the controller names, with ".." above it."""
        root = res.container_path if self.container == "/" else "/"
        try:
            float_cpus = (
                cpus.parse(res.float_cpus)
                if res.float_cpus
                else self.cg.cpus(res.float_path, effective=False)
            )
        except (CgroupError, cpus.CpuListError) as e:
            raise StartupError(f"float's CPUs: {e}") from None
        return Cgroups(
            kube.view(res.float_path, root), kube.view(res.cgroup_path, root), float_cpus, root
        )

    async def maintain(self) -> None:
        await trio.sleep_forever()  # the controller keeps float

    async def release(self) -> None:
        if not self.asked:
            return
        here = kube.own_cgroup_path(None, procfs.read("/proc/self/cgroup"))
        if here != self.container:
            log.warning(
                "deregister-skipped",
                reason=f"we are in {here}, not the container cgroup, so the controller "
                "cannot tell our pod",
                detail="it removes the instance cgroup once the pod leaves cpu_manager_state",
            )
            return
        try:
            await rpc.call(
                self.socket,
                "deregisterCgroup",
                rpc.DeregisterParams(self.uuid),
                rpc.DeregisterResult,
                timeout=min(10, self.timeout),
            )
        except (OSError, rpc.RPCError, trio.TooSlowError) as e:
            # Not a failed teardown: a threadless instance of a pod that is gone is stale, and
            # the controller removes it on its own.
            log.warning(
                "deregister-failed",
                error=str(e) or type(e).__name__,
                detail="the controller removes the instance cgroup once the pod leaves "
                "cpu_manager_state",
            )

    async def _ask(self, method: str, params: object, result: type) -> object:
        """One write the controller makes for us; its refusal is a CgroupError (one line)."""
        try:
            return await rpc.call(
                self.socket, method, params, result, timeout=min(10, self.timeout)
            )
        except (OSError, rpc.RPCError, trio.TooSlowError) as e:
            raise CgroupError(
                f"the controller did not {method}: {str(e) or type(e).__name__}"
            ) from None

    async def enter_float(self, pid: int) -> None:
        await self._ask("moveProcess", rpc.MoveParams(self.uuid, pid, "float"), rpc.MoveResult)

    async def leave_float(self, pid: int) -> None:
        await self._ask("moveProcess", rpc.MoveParams(self.uuid, pid, "container"), rpc.MoveResult)

    async def join_container(self, pid: int) -> None:
        await self.leave_float(pid)

    async def place(self, qemu: int, placed: list[Placed], anchor: int) -> None:
        try:
            await self._ask(
                "placeVcpus", rpc.PlaceParams(self.uuid, qemu, anchor, placed), rpc.PlaceResult
            )
        except CgroupError as e:
            raise PinError(str(e)) from None

    async def status(self) -> rpc.StatusResult | None:
        try:
            res = await rpc.call(
                self.socket,
                "instanceStatus",
                rpc.StatusParams(self.uuid),
                rpc.StatusResult,
                timeout=STATUS_DEADLINE,
            )
        except (OSError, ValueError, rpc.RPCError, trio.TooSlowError) as e:
            if not self.status_failing:
                log.warning("status-unavailable", error=str(e) or type(e).__name__)
            self.status_failing = True
            return None
        self.status_failing = False
        assert isinstance(res, rpc.StatusResult)
        return res


def make_source(
    cg: CgroupFS,
    root: str,
    kubelet_dir: str,
    pod: kube.PodCgroup,
    controller_socket: str | None,
    controller_timeout: float,
    mode: partition.PartitionMode = "none",
) -> CgroupSource:
    if controller_socket:
        return FromController(controller_socket, controller_timeout, pod.pod_uid, cg, pod.path)
    return Embedded(cg, root, kubelet_dir, pod.pod_uid, pod.path, mode)
