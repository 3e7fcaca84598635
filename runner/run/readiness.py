"""The readiness file: what a probe, a test or an operator reads to see the instance placed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from runner import cpus
from runner.placement import Layout
from runner.plan import Placed
from runner.run.cgroupsource import Cgroups
from runner.run.preflight import Prepared


def ready_doc(
    pre: Prepared,
    qemu_pid: int,
    cgroups: Cgroups | None,
    placed: list[Placed],
    status: str,
    ticks: dict[int, int],
    unpinned_ns: dict[int, int],
    timings: dict[str, float],
) -> dict[str, Any]:
    iso = pre.isolation
    return {
        "name": pre.spec.name,
        "isolation": "on" if iso else "off",
        "pod_uid": iso.pod.pod_uid if iso else None,
        "qemu_pid": qemu_pid,
        "instance_cgroup": cgroups.instance if cgroups else None,
        "float_cgroup": cgroups.float if cgroups else None,
        "float_cpus": cpus.format(cgroups.float_cpus) if cgroups else None,
        "cgroup_namespace_root": cgroups.ns_root if cgroups else None,
        "vcpus": [
            {"vcpu": p.vcpu, "tid": p.tid, "cpu": p.cpu, "fifo_priority": p.priority}
            for p in placed
        ],
        "guest_topology": guest_topology(iso.plan.layout) if iso else None,
        "status_at_pin": status,
        "vcpu_ticks_before_cont": ticks,
        "vcpu_cpu_ns_before_pin": unpinned_ns,
        "nics": [
            {
                "mac": pre.spec.mac(i),
                "binding": n.binding,
                # passt: the pod's own addresses
                "ip": n.ip if n.binding != "passt" else None,
                "ip6": str(pre.spec.guest6(i)) if n.ipv6_prefix else None,
                "tap": pre.spec.tap_name(i) if n.makes_tap else None,
            }
            for i, n in enumerate(pre.spec.nics)
        ],
        "timings_ms": timings,
    }


def guest_topology(layout: Layout) -> dict[str, Any]:
    return {
        "sockets": layout.sockets,
        "cores": layout.cores,
        "threads": layout.threads,
        "numa_nodes": [
            {
                "vcpus": list(n.vcpus),
                "memory_mib": n.memory_mib,
                "host_node": n.host_node,
            }
            for n in layout.nodes
        ],
        "mems": cpus.format(layout.mems),
        "device_nodes": list(layout.device_nodes),
        "warnings": list(layout.warnings),
    }


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_ready(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc, indent=1))
