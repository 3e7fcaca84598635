"""The runner seen from outside: /metrics, /healthz and /readyz on one listener. Each request
reads what it needs at that moment (/proc, cpu.pressure, the runner's counters); nothing is
read between requests, so an unscraped runner costs nothing more."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from runner import httpd, rpc
from runner.log import log
from runner.node import procfs
from runner.node.cgroupfs import pressures
from runner.node.pinning import KeptCounts
from runner.plan import in_place
from runner.run import metrics
from runner.run.metrics import DiskSample, Sample, VcpuSample

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from runner.run.steps import Startup

# The text format every Prometheus and agent reads (the escaping of names this old format
# needs changes nothing: ours are plain).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class VcpuCounters:
    """Each vCPU's counters, read from /proc when asked. The last reading is kept: once QEMU
    has exited its threads are gone, and the totals logged at exit come from here."""

    def __init__(self) -> None:
        self.last: dict[int, VcpuSample] = {}

    def read(self, s: Startup) -> tuple[VcpuSample, ...]:
        qemu = s.guest.qemu
        if qemu is None:
            return ()
        cpu_of = {p.vcpu: p.cpu for p in s.placed}
        instance = s.cgroups.instance if s.cgroups is not None else None
        for vcpu, tid in sorted(s.vcpu_tids.items()):
            cpu = cpu_of.get(vcpu)
            try:
                t = procfs.thread(qemu.pid, tid)
            except (OSError, KeyError, ValueError):
                if vcpu in self.last:  # gone with QEMU: what it had, no longer placed
                    self.last[vcpu] = _unplaced(self.last[vcpu])
                continue
            self.last[vcpu] = VcpuSample(
                vcpu=vcpu,
                cpu=cpu,
                run_ns=t.run_ns,
                delay_ns=t.delay_ns,
                involuntary=t.involuntary,
                placed=in_place(t.cgroup, t.allowed, instance, cpu),
            )
        return tuple(self.last[v] for v in sorted(self.last))


def _unplaced(v: VcpuSample) -> VcpuSample:
    return VcpuSample(v.vcpu, v.cpu, v.run_ns, v.delay_ns, v.involuntary, False)


def guest_status(s: Startup) -> str:
    qemu = s.guest.qemu
    if qemu is None:
        return "starting"
    if not qemu.running:
        return "exited"
    return s.guest.status


def sample(
    s: Startup, remote: rpc.StatusResult | None = None, disks: tuple[DiskSample, ...] = ()
) -> Sample:
    """`remote`: what the controller read for us (controller mode), where the runner, in a
    private cgroup namespace, cannot read the node's cgroups; and what its keeper did."""
    iso = s.pre.isolation
    k = s.keeper
    cg = s.cgroups
    pressure, kept = metrics.instance_view(
        iso is None or iso.source.keeps,
        k.counts() if k else KeptCounts(),
        lambda: (
            pressures(iso.cg, {"instance": cg.instance, "float": cg.float})
            if iso is not None and cg is not None
            else {}
        ),
        remote,
    )
    return Sample(
        name=s.pre.spec.name,
        pod_uid=iso.pod.pod_uid if iso else "",
        isolation="on" if iso else "off",
        mode="controller" if s.opts.controller_socket else "embedded",
        guest_status=guest_status(s),
        vcpus=s.vcpu_counters.read(s),
        pressure=pressure,
        kept=kept,
        orphans_reaped=s.reaper.orphans_reaped,
        restarts=dict(s.reaper.restarts),
        step_seconds=dict(s.step_seconds),
        running_after=s.running_after,
        disks=disks,
    )


async def disk_stats(s: Startup) -> tuple[DiskSample, ...]:
    """QEMU's counters of each disk, asked at a scrape (never between); none before QMP is
    up or once QEMU is gone."""
    qemu = s.guest.qemu
    if not s.qmp_ready or qemu is None or not qemu.running:
        return ()
    try:
        answer = await s.guest.qmp.execute("query-blockstats", timeout=2)
    except Exception as e:  # a scrape never fails for it: the disks are left out
        log.debug("blockstats-unavailable", error=f"{type(e).__name__}: {e}")
        return ()
    return metrics.parse_blockstats(answer)


def stale_monitors(s: Startup, now: float) -> dict[str, float]:
    """Monitors later than they should be: the vCPU check runs every --verify-interval."""
    keeper, interval = s.keeper, s.opts.verify_interval
    if s.phase != "running" or keeper is None or interval <= 0:
        return {}
    age = now - keeper.last_round
    return {"verify": age} if age > 3 * interval + 5 else {}


def routes(s: Startup) -> dict[str, httpd.Route]:
    # Imported here: only a runner that serves metrics pays for the import (~0.1 s).
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.registry import Collector

    class Instance(Collector):
        remote: rpc.StatusResult | None = None
        disks: tuple[DiskSample, ...] = ()

        def collect(self) -> Iterator[Metric]:
            yield from metrics.families(sample(s, self.remote, self.disks))

    instance = Instance()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(instance)
    ProcessCollector(registry=registry)  # the runner's own CPU time and memory

    async def scrape() -> httpd.Reply:
        iso = s.pre.isolation
        # Asked for at each scrape, never between: an unscraped runner stays idle.
        instance.remote = await iso.source.status() if iso and s.cgroups else None
        instance.disks = await disk_stats(s)
        return 200, generate_latest(registry).decode(), CONTENT_TYPE

    def health() -> httpd.Reply:
        return metrics.healthz(s.monitor_errors, stale_monitors(s, time.monotonic()))

    def ready() -> httpd.Reply:
        status = guest_status(s)
        return metrics.readyz(s.phase, status, s.vcpu_counters.read(s), s.pre.isolation is not None)

    return {"/metrics": scrape, "/healthz": health, "/readyz": ready}


def log_vcpu_totals(s: Startup) -> None:
    """One line per vCPU at the end: what it waited, ran and lost over the guest's life."""
    for v in s.vcpu_counters.read(s):
        log.info(
            "vcpu-totals",
            vcpu=v.vcpu,
            cpu=v.cpu,
            run_delay_s=round(v.delay_ns / 1e9, 6),
            cpu_s=round(v.run_ns / 1e9, 3),
            involuntary_switches=v.involuntary,
        )
