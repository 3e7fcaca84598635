"""What the runner exports, decided from a plain sample: the metric families for Prometheus,
and the answers of /healthz and /readyz. Pure: observer.py reads the sample when asked.

Every value is read when scraped (no timer of ours wakes for it), and counters are the
kernel's own (schedstat, cpu.pressure), so a scrape interval changes nothing but resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs

from runner import rpc
from runner.node.cgroupfs import Pressure
from runner.node.pinning import KeptCounts

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

PREFIX = "instance_runner_"
# The guest's states, as QMP's query-status and events name them, plus the runner's own
# before QMP answers and after QEMU is gone.
GUEST_STATES = (
    "starting",
    "prelaunch",
    "paused",
    "running",
    "shutdown",
    "guest-panicked",
    "exited",
)


Kept = tuple[list[str], KeptCounts]  # label values, counts


@attrs.frozen
class VcpuSample:
    vcpu: int
    cpu: int | None  # its dedicated CPU; None with isolation off
    run_ns: int
    delay_ns: int
    involuntary: int
    placed: bool  # in the instance cgroup, allowed on its CPU alone


@attrs.frozen
class DiskSample:
    """One disk's counters as QEMU keeps them (query-blockstats)."""

    disk: str
    read_ops: int = 0
    write_ops: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    read_ns: int = 0  # time the guest's reads took, throttling included
    write_ns: int = 0


def parse_blockstats(answer: object) -> tuple[DiskSample, ...]:
    """query-blockstats' answer (QEMU's, so shaped as QEMU documents it; anything else is
    skipped): the runner's disks and the seed, by their drive ids."""
    out = []
    for entry in answer if isinstance(answer, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
            continue
        st, disk = entry["stats"], entry.get("device") or entry.get("qdev") or ""

        def n(key: str, st: dict[str, object] = st) -> int:
            value = st.get(key, 0)
            return value if isinstance(value, int) else 0

        out.append(
            DiskSample(
                disk=str(disk),
                read_ops=n("rd_operations"),
                write_ops=n("wr_operations"),
                read_bytes=n("rd_bytes"),
                write_bytes=n("wr_bytes"),
                read_ns=n("rd_total_time_ns"),
                write_ns=n("wr_total_time_ns"),
            )
        )
    return tuple(out)


@attrs.frozen
class Sample:
    name: str
    pod_uid: str
    isolation: str
    mode: str
    guest_status: str
    vcpus: tuple[VcpuSample, ...] = ()
    pressure: Mapping[str, Pressure] = attrs.Factory(dict)  # "instance" / "float" -> totals
    # What keeping the vCPUs placed did: the runner's keeper, or the controller's for this
    # pod; None when the controller did not say.
    kept: KeptCounts | None = attrs.Factory(KeptCounts)
    orphans_reaped: int = 0
    restarts: Mapping[str, int] = attrs.Factory(dict)  # child -> restarts
    step_seconds: Mapping[str, float] = attrs.Factory(dict)
    running_after: float | None = None
    disks: tuple[DiskSample, ...] = ()


def instance_view(
    runner_keeps: bool,
    own: KeptCounts,
    local: Callable[[], Mapping[str, Pressure]],
    remote: rpc.StatusResult | None,
) -> tuple[dict[str, Pressure], KeptCounts | None]:
    """cpu.pressure and the keeping counts for a sample. What the controller read for us
    comes first (in a private cgroup namespace we can read neither cgroup); `local` is read
    only without it. The counts are our keeper's when we keep the vCPUs, else the
    controller's, or None when it did not say."""
    pressure = dict(remote.pressure) if remote is not None else dict(local())
    if runner_keeps:
        return pressure, own
    return pressure, remote.kept if remote is not None else None


def families(s: Sample) -> Iterator[Metric]:
    """The runner's metric families for one sample."""
    # Imported here: only a runner that serves metrics pays for the import.
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    info = GaugeMetricFamily(
        PREFIX + "info",
        "The instance this runner runs (always 1).",
        labels=["name", "pod_uid", "isolation", "mode"],
    )
    info.add_metric([s.name, s.pod_uid, s.isolation, s.mode], 1)
    yield info
    yield from _vcpu_families(s.vcpus)
    yield from _pressure_families(s.pressure)
    yield CounterMetricFamily(
        PREFIX + "orphans_reaped", "Orphaned processes reaped as PID 1.", value=s.orphans_reaped
    )
    if s.kept is not None:
        yield from keeping(PREFIX, [], [([], s.kept)])
    yield from _lifecycle_families(s)
    yield from _disk_families(s.disks)


def _disk_families(disks: tuple[DiskSample, ...]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    fields = [
        ("read_operations", "Read requests the guest completed on the disk.", "read_ops", 1),
        ("write_operations", "Write requests the guest completed on the disk.", "write_ops", 1),
        ("read_bytes", "Bytes the guest read from the disk.", "read_bytes", 1),
        ("written_bytes", "Bytes the guest wrote to the disk.", "write_bytes", 1),
        ("read_seconds", "Time the guest's reads took, throttling included.", "read_ns", 1e9),
        ("write_seconds", "Time the guest's writes took, throttling included.", "write_ns", 1e9),
    ]
    for name, doc, attr, scale in fields:
        family = CounterMetricFamily(PREFIX + "disk_" + name, doc, labels=["disk"])
        for d in disks:
            family.add_metric([d.disk], getattr(d, attr) / scale)
        yield family


def _vcpu_families(vcpus: tuple[VcpuSample, ...]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["vcpu", "cpu"]
    delay = CounterMetricFamily(
        PREFIX + "vcpu_delay_seconds",
        "Time the vCPU thread was runnable but waited for a CPU (schedstat run delay): what "
        "a guest feels as steal. 0 growth is the goal.",
        labels=labels,
    )
    ran = CounterMetricFamily(
        PREFIX + "vcpu_seconds", "Time the vCPU thread ran on a CPU (schedstat).", labels=labels
    )
    involuntary = CounterMetricFamily(
        PREFIX + "vcpu_involuntary_switches",
        "Times the vCPU thread was taken off its CPU while it still wanted to run.",
        labels=labels,
    )
    placed = GaugeMetricFamily(
        PREFIX + "vcpu_placement_ok",
        "1 while the vCPU thread is in the instance cgroup and allowed on its dedicated CPU "
        "alone, else 0.",
        labels=labels,
    )
    for v in vcpus:
        key = [str(v.vcpu), "" if v.cpu is None else str(v.cpu)]
        delay.add_metric(key, v.delay_ns / 1e9)
        ran.add_metric(key, v.run_ns / 1e9)
        involuntary.add_metric(key, v.involuntary)
        placed.add_metric(key, 1 if v.placed else 0)
    yield from (delay, ran, involuntary, placed)


def _pressure_families(pressure: Mapping[str, Pressure]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    waiting = CounterMetricFamily(
        PREFIX + "cpu_pressure_waiting_seconds",
        "cpu.pressure 'some' of the cgroup: time at least one of its tasks waited for a CPU.",
        labels=["cgroup"],
    )
    stalled = CounterMetricFamily(
        PREFIX + "cpu_pressure_stalled_seconds",
        "cpu.pressure 'full' of the cgroup: time all of its runnable tasks waited at once.",
        labels=["cgroup"],
    )
    for cgroup, p in sorted(pressure.items()):
        waiting.add_metric([cgroup], p.some_us / 1e6)
        if p.full_us is not None:
            stalled.add_metric([cgroup], p.full_us / 1e6)
    yield from (waiting, stalled)


def _lifecycle_families(s: Sample) -> Iterator[Metric]:
    """Helper restarts, start-up timings and the guest's state."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    restarts = CounterMetricFamily(
        PREFIX + "child_restarts",
        "Restarts of a helper the runner keeps alive (the anchor, dnsmasq per tap).",
        labels=["child"],
    )
    for child, n in sorted(s.restarts.items()):
        restarts.add_metric([child], n)
    yield restarts

    steps = GaugeMetricFamily(
        PREFIX + "startup_step_seconds",
        "How long each start-up step took, in the order of the steps.",
        labels=["step"],
    )
    for step, seconds in s.step_seconds.items():
        steps.add_metric([step], seconds)
    yield steps
    if s.running_after is not None:
        yield GaugeMetricFamily(
            PREFIX + "startup_seconds",
            "From the runner's exec to the guest running with every vCPU placed.",
            value=s.running_after,
        )

    status = GaugeMetricFamily(
        PREFIX + "guest_status",
        "1 for the guest's current state, 0 for the others.",
        labels=["status"],
    )
    for state in GUEST_STATES:
        status.add_metric([state], 1 if state == s.guest_status else 0)
    yield status


# --- probes ---------------------------------------------------------------------------------


def healthz(failed: Mapping[str, str], stale: Mapping[str, float]) -> tuple[int, str]:
    """Alive: the event loop answers (else there is no answer at all) and every monitor of
    the running guest is still running. `failed`: monitor -> its error; `stale`: monitor ->
    seconds since it last finished a round, for those later than they should be."""
    if failed:
        return 503, "".join(f"monitor {m} failed: {e}\n" for m, e in sorted(failed.items()))
    if stale:
        return 503, "".join(f"monitor {m} silent for {s:.0f} s\n" for m, s in sorted(stale.items()))
    return 200, "ok\n"


def readyz(
    phase: str, guest_status: str, vcpus: tuple[VcpuSample, ...], isolated: bool
) -> tuple[int, str]:
    """Ready: the guest runs, and (isolated) every vCPU is where it belongs."""
    if phase != "running":
        return 503, f"not running: {phase}\n"
    if guest_status != "running":
        return 503, f"guest {guest_status}\n"
    if isolated:
        off = [v.vcpu for v in vcpus if not v.placed]
        if off or not vcpus:
            return 503, f"vCPUs not placed: {', '.join(map(str, off)) or 'none known'}\n"
    return 200, "ready\n"


def keeping(prefix: str, labels: list[str], rows: list[Kept]) -> Iterator[Metric]:
    """What keeping instances' vCPUs placed did: the runner's own (embedded mode), or the
    controller's for each pod (controller mode), under the same names."""
    from prometheus_client.core import CounterMetricFamily

    drifts = CounterMetricFamily(
        prefix + "vcpu_drifts", "vCPU threads found off their cgroup or CPU.", labels=labels
    )
    repins = CounterMetricFamily(
        prefix + "vcpu_repins", "vCPU threads put back after a drift.", labels=labels
    )
    moved = CounterMetricFamily(
        prefix + "moved_to_float",
        "Moved to float, off the dedicated CPUs: processes from the container cgroup (exec, "
        "probes), threads that were no vCPU from the instance cgroup.",
        labels=[*labels, "from"],
    )
    for values, c in rows:
        drifts.add_metric(values, c.drifts)
        repins.add_metric(values, c.repins)
        moved.add_metric([*values, "container"], c.moved_to_float)
        moved.add_metric([*values, "instance"], c.evicted)
    yield from (drifts, repins, moved)
