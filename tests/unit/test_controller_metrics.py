"""The controller counts what it answered by method and reason, never by what a caller
wrote, and reads what it holds when scraped."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from runner.controller.identity import Peer
from runner.controller.metrics import Held
from runner.controller.service import ControllerOptions, Service

UID = "0b0e5a4e-1111-2222-3333-444455556666"
PEER = Peer(pid=4242, pod=None, how="test")


def samples(service: Service) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    code, text, kind = service.metrics.scrape()
    assert code == 200 and kind.startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def request(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


async def test_answers_are_counted_by_method_and_reason(tmp_path: Path) -> None:
    service = Service(ControllerOptions(cgroup_mount=str(tmp_path), kubelet_dir=str(tmp_path)))
    service.metrics.hold(
        Held(
            instances=lambda: 3,
            float_cpus=lambda: 5,
            connections=lambda: 2,
            stale_removed=lambda: 1,
            kernel_threads_moved=lambda: 4,
        )
    )
    await service.dispatch(PEER, b"{not json")
    await service.dispatch(PEER, request("x" * 500))  # a hostile method name
    await service.dispatch(PEER, request("listInstances"))
    await service.dispatch(PEER, request("registerCgroup", uuid="u", cpuset="1"))
    # Not in a pod: refused before anything is read or written.
    await service.dispatch(PEER, request("deregisterCgroup", uuid=UID))
    m = samples(service)
    assert m["instance_runner_controller_requests_total"] == {
        (("method", "-"), ("result", "parse-error")): 1,
        (("method", "-"), ("result", "method-not-found")): 1,
        (("method", "listInstances"), ("result", "forbidden")): 1,
        (("method", "registerCgroup"), ("result", "invalid-params")): 1,
        (("method", "deregisterCgroup"), ("result", "forbidden")): 1,
    }
    assert m["instance_runner_controller_instances"] == {(): 3}
    assert m["instance_runner_controller_float_cpus"] == {(): 5}
    assert m["instance_runner_controller_open_connections"] == {(): 2}
    assert m["instance_runner_controller_stale_instances_removed_total"] == {(): 1}
    assert m["instance_runner_controller_kernel_threads_moved_total"] == {(): 4}
    assert "process_cpu_seconds_total" in m


async def test_a_reconcile_is_timed(tmp_path: Path) -> None:
    service = Service(ControllerOptions(cgroup_mount=str(tmp_path), kubelet_dir=str(tmp_path)))
    service.keeper.timed(0.003)
    service.keeper.timed(0.2)
    service.metrics.hold(Held(lambda: 0, lambda: None, lambda: 0, lambda: 0))
    m = samples(service)
    assert m["instance_runner_controller_reconcile_seconds_count"] == {(): 2}
    assert m["instance_runner_controller_reconcile_seconds_bucket"][(("le", "0.005"),)] == 1
    assert "instance_runner_controller_float_cpus" not in m  # no float yet: no false 0
