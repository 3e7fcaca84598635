"""The float rule, and the one keeper that applies it: in embedded mode every runner runs it
for the node, in controller mode the controller does.

float = kubelet's shared CPUs (policy "none": every CPU), online, less every CPU an instance
cgroup still holds. With kubelet's state unknown (see runner.node.kubelet), float keeps the
CPUs it has.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection

import trio

from runner import cpus
from runner.cpus import CpuSet
from runner.kube import KubeletState
from runner.log import log
from runner.node import partition, podfloat
from runner.node.cgroupfs import CgroupError
from runner.node.kubelet import Unknown, read_state, watch_kubelet_state
from runner.node.layout import Layout, held_cpus, online_cpus, root_weight, stale


def float_target(
    state: KubeletState | Unknown, online: CpuSet, held: CpuSet, current: CpuSet | None
) -> CpuSet | None:
    """The CPUs float should have; None when there is none to give (no float yet and the
    state unknown, or every shared CPU held): the caller then keeps float as it is."""
    if isinstance(state, Unknown):
        if current is None:
            return None
        base = current
    elif state.default_cpus:
        base = state.default_cpus
    else:
        base = online  # policy "none" writes "": no CPU is exclusive
    return ((base & online) - held) or None


class FloatUnknown(Exception):
    """There is no float yet and nothing safe to make it from."""


class FloatKeeper:
    def __init__(
        self,
        layout: Layout,
        kubelet_dir: str,
        young: Callable[[], Collection[str]] = tuple,
        online: Callable[[], CpuSet] = online_cpus,
        timed: Callable[[float], None] = lambda _seconds: None,
    ) -> None:
        self.layout = layout
        self.online = online
        self.kubelet_dir = kubelet_dir
        self.young = young  # instance uuids too fresh to be stale (registered, not pinned)
        self.timed = timed  # told how long each resync took
        self.removed = 0  # stale instance cgroups removed
        self._unknown: str | None = None
        self._wake = trio.Event()

    async def resync(self, reason: str, held: CpuSet = frozenset()) -> CpuSet:
        """Remove stale instance cgroups, then make float what the rule says (creating it if
        needed) and spread its threads over it. `held`: CPUs about to be taken by an instance
        that has no cgroup yet. Returns float's CPUs; FloatUnknown if it has none."""
        began = time.monotonic()
        try:
            return await self._resync(reason, held)
        finally:
            self.timed(time.monotonic() - began)

    async def _resync(self, reason: str, held: CpuSet) -> CpuSet:
        layout, cg = self.layout, self.layout.cg
        state = read_state(self.kubelet_dir)
        self._note(state)
        instances = layout.instances()
        for inst in stale(instances, state, self.young()):
            try:
                await cg.remove(inst.path, attempts=3, delay=0.1)
            except CgroupError as e:
                log.warning("stale-instance-kept", uuid=inst.uuid, error=str(e))
                continue
            del instances[inst.uuid]
            self.removed += 1
            log.info(
                "instance-removed",
                uuid=inst.uuid,
                cpus=cpus.format(inst.cpus),
                reason="stale: pod gone from cpu_manager_state and no thread left",
            )
        for uuid, path in layout.pod_floats().items():
            gone = uuid not in instances and not cg.exists(layout.instance(uuid))
            if gone and await podfloat.remove(cg, path):
                log.info(
                    "pod-float-removed", uuid=uuid, reason="its instance is gone, and it is empty"
                )
        try:  # what removed ones claimed as isolated partitions goes back to the root's
            partition.trim(cg, layout.root, [i.path for i in instances.values()])
        except (partition.PartitionError, CgroupError) as e:
            log.warning("partition-trim-failed", error=str(e))
        self.weigh(held_cpus(instances) | held)
        current = layout.float_cpus()
        want = float_target(state, self.online(), held_cpus(instances) | held, current)
        if want is None:
            if current is None:
                raise FloatUnknown(
                    state.reason
                    if isinstance(state, Unknown)
                    else "every shared CPU is held by an instance"
                )
            if not isinstance(state, Unknown):
                log.warning(
                    "float-unchanged",
                    reason="no shared CPU would be left",
                    cpus=cpus.format(current),
                )
            return current
        self.apply(current, want, reason)
        return want

    def weigh(self, held: CpuSet) -> None:
        """`<root>`'s cpu.weight as the rule says, where the cpu controller reaches it."""
        cg, root = self.layout.cg, self.layout.root
        if not (cg.dir(root) / "cpu.weight").exists():
            return  # no cpu controller delegated to <root>'s parent
        want = root_weight(held)
        try:
            have = int(cg.read(root, "cpu.weight"))
            if have != want:
                cg.write(root, "cpu.weight", str(want))
                log.info("root-weight", old=have, new=want, held_cpus=len(held))
        except (CgroupError, ValueError) as e:
            log.warning("root-weight-failed", error=str(e))

    def apply(self, current: CpuSet | None, want: CpuSet, reason: str) -> None:
        """Write, then spread, then log. The spread is what 6.2+ needs: a thread keeps the
        affinity it was given, so a float that grows does not reach it by itself."""
        cg, path = self.layout.cg, self.layout.float
        if current is None:
            cg.make_threaded(path, want, frozenset())
        elif want != current:
            cg.set_cpus(path, want)
        if want != current:
            cg.spread_threads(path, want)
            log.info(
                "float-cpus",
                old=cpus.format(current) if current is not None else None,
                new=cpus.format(want),
                reason=reason,
            )

    def _note(self, state: KubeletState | Unknown) -> None:
        reason = state.reason if isinstance(state, Unknown) else None
        if reason is not None and reason != self._unknown:
            log.warning("kubelet-state-unreadable", error=reason, detail="float kept as it is")
        elif reason is None and self._unknown is not None:
            log.info("kubelet-state-readable")
        self._unknown = reason

    def poke(self) -> None:
        """Resync soon (kubelet's file changed, an instance came or went)."""
        self._wake.set()

    async def follow(self, interval: float, lock: trio.Lock | None = None) -> None:
        """Resync at once, then whenever poked (the kubelet watch pokes) and at least every
        `interval` seconds. Errors are logged; the loop goes on."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_kubelet_state, self.kubelet_dir, self.poke, interval)
            reason = "start"
            while True:
                self._wake = trio.Event()
                try:
                    async with lock if lock is not None else _nothing():
                        await self.resync(reason)
                except FloatUnknown as e:
                    log.warning("float-not-made", reason=str(e))
                except Exception as e:  # a bad moment in cgroupfs must not stop the loop
                    log.error("float-resync-failed", error=f"{type(e).__name__}: {e}")
                with trio.move_on_after(interval):
                    await self._wake.wait()
                reason = "event" if self._wake.is_set() else "periodic"


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield
