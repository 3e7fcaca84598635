"""The controller's metrics: what it answered, what it holds, how long a reconcile takes.
Counters count as things happen; what it holds (instances, float CPUs, connections) is read
when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runner import rpc
from runner.run.metrics import Kept, keeping

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

PREFIX = "instance_runner_controller_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# JSON-RPC error codes as the reasons a refusal is counted under.
REASONS = {
    rpc.PARSE_ERROR: "parse-error",
    rpc.INVALID_REQUEST: "invalid-request",
    rpc.METHOD_NOT_FOUND: "method-not-found",
    rpc.INVALID_PARAMS: "invalid-params",
    rpc.INTERNAL_ERROR: "internal-error",
    rpc.FORBIDDEN: "forbidden",
    rpc.CONFLICT: "conflict",
    rpc.BUSY: "busy",
    rpc.TOO_LARGE: "too-large",
}


def reason(code: int) -> str:
    return REASONS.get(code, str(code))


class Held:
    """What the controller holds, read when scraped."""

    def __init__(
        self,
        instances: Callable[[], int],
        float_cpus: Callable[[], int | None],
        connections: Callable[[], int],
        stale_removed: Callable[[], int],
        kernel_threads_moved: Callable[[], int] = lambda: 0,
        kept: Callable[[], list[Kept]] = list,
    ) -> None:
        self.instances = instances
        self.float_cpus = float_cpus
        self.connections = connections
        self.stale_removed = stale_removed
        self.kernel_threads_moved = kernel_threads_moved
        self.kept = kept  # per pod whose vCPUs it keeps: [pod uid] and its counts


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "JSON-RPC requests answered, by method and result (ok, or the refusal's reason).",
            ["method", "result"],
            registry=r,
        )
        self.reconcile = Histogram(
            PREFIX + "reconcile_seconds",
            "How long one reconcile (stale instances removed, float made what the rule says) took.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.task_failures = Counter(
            PREFIX + "task_failures",
            "Failures of the controller's own tasks, each logged and the task restarted after a "
            "backoff: keeper (one pod's vCPUs), follow (float), kernel-sweep, connection.",
            ["task"],
            registry=r,
        )
        ProcessCollector(registry=r)
        self._held: Held | None = None

    def hold(self, held: Held) -> None:
        """Where the gauges come from; registered once."""
        self._held = held
        outer = self

        class Gauges(Collector):
            def collect(self) -> Iterator[Metric]:
                yield from outer._gauges()

        self.registry.register(Gauges())

    def _gauges(self) -> Iterator[Metric]:
        held = self._held
        assert held is not None
        yield GaugeMetricFamily(
            PREFIX + "instances", "Instance cgroups under the root.", value=held.instances()
        )
        float_cpus = held.float_cpus()
        if float_cpus is not None:  # no float yet: no sample, rather than a false 0
            yield GaugeMetricFamily(
                PREFIX + "float_cpus", "CPUs of the shared float cgroup.", value=float_cpus
            )
        yield GaugeMetricFamily(
            PREFIX + "open_connections", "Open JSON-RPC connections.", value=held.connections()
        )
        yield CounterMetricFamily(
            PREFIX + "stale_instances_removed",
            "Instance cgroups removed because their pod was gone and no thread was left.",
            value=held.stale_removed(),
        )
        yield CounterMetricFamily(
            PREFIX + "kernel_threads_moved",
            "Kernel threads (KVM's workers) moved from a VM pod's container cgroup to float.",
            value=held.kernel_threads_moved(),
        )
        yield from keeping(PREFIX, ["pod_uid"], held.kept())

    def answered(self, method: str, code: int | None) -> None:
        """One request answered: `code` None for a result, else its error code."""
        self.requests.labels(method, "ok" if code is None else reason(code)).inc()

    def task_failed(self, task: str) -> None:
        self.task_failures.labels(task).inc()

    def scrape(self) -> tuple[int, str, str]:
        return 200, generate_latest(self.registry).decode(), CONTENT_TYPE
