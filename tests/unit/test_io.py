"""Disks in the spec: IO limits as QEMU's throttling options, image disks, disks made at a
size; their refusals. Real QEMU takes them in tests/e2e/test_disks.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner import argv, spec
from runner.run import preflight
from runner.run.options import StartupError


def load(**fields: Any) -> spec.InstanceSpec:
    return spec.load(json.dumps({"name": "d", "vcpus": 1, "memory_mib": 64, **fields}))


def drives(s: spec.InstanceSpec) -> list[str]:
    full = argv.qemu_argv(s, "tcg", argv.Wiring(qmp_fd=3))
    return [full[i + 1] for i, x in enumerate(full) if x == "-drive"]


def test_limits_are_the_instances_group_unless_a_disk_has_its_own() -> None:
    s = load(
        disks=[{"path": "/a"}, {"path": "/b", "io": {"write_bps": 1000}}],
        io={"iops": 100, "iops_burst": 300},
    )
    a, b = drives(s)
    assert a.endswith(
        ",throttling.iops-total=100,throttling.iops-total-max=300,throttling.group=instance"
    )
    assert b.endswith(",throttling.bps-write=1000,throttling.group=disk1")
    assert "throttling" not in drives(load(disks=[{"path": "/a"}]))[0]


def test_an_image_is_a_snapshot_unless_read_only() -> None:
    (rw,) = drives(load(disks=[{"image": "/img/base.qcow2", "format": "qcow2"}]))
    assert "file=/img/base.qcow2,format=qcow2" in rw and rw.endswith(",snapshot=on")
    (ro,) = drives(load(disks=[{"image": "/img/base.qcow2", "read_only": True}]))
    assert "snapshot" not in ro and "readonly=on" in ro


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"io": {}}, "at least one limit"),
        ({"io": {"iops": 0}}, "between 1 and"),
        ({"io": {"iops": 10, "read_iops": 5}}, "not both"),
        ({"io": {"bps_burst": 10}}, "needs bps"),
        ({"io": {"iops": 10, "iops_burst": 5}}, "at least as much"),
        ({"disks": [{"path": "/a", "image": "/b"}]}, "exactly one of path, fd and image"),
        ({"disks": [{"image": "/b", "size_gib": 1}]}, "size_gib makes a raw file"),
        ({"disks": [{"path": "/a", "size_gib": 0}]}, "between 1 and 65536"),
        ({"disks": [{"path": "/a", "cache": "fast"}]}, "must be one of none, writeback"),
    ],
)
def test_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(spec.SpecError, match=message):
        load(**fields)


def test_disks_as_found(tmp_path: Path) -> None:
    f = tmp_path / "disk.raw"
    f.write_bytes(b"")
    (d,) = preflight.disks_as_found(load(disks=[{"path": str(f)}]).disks, str(tmp_path))
    assert d.cache == "writeback"  # a file; a block device gets "none" (and native AIO)
    huge = load(disks=[{"path": str(tmp_path / "new.img"), "size_gib": 65536}])
    with pytest.raises(StartupError, match="less than size_gib 65536"):
        preflight.disks_as_found(huge.disks, str(tmp_path))
    image = load(disks=[{"image": str(f)}])
    with pytest.raises(StartupError, match="needs a writable --scratch-dir"):
        preflight.disks_as_found(image.disks, "/nonexistent")


def test_disk_counters_on_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from runner.run import metrics

    answer = [
        {
            "device": "disk0",
            "stats": {"rd_operations": 3, "wr_bytes": 4096, "rd_total_time_ns": 2e9},
        },
        {"device": "", "qdev": "/machine/peripheral-anon/device[1]", "stats": {"wr_operations": 1}},
        {"device": "bad", "stats": "nope"},
        "junk",
    ]
    disks = metrics.parse_blockstats(answer)
    assert [d.disk for d in disks] == ["disk0", "/machine/peripheral-anon/device[1]"]
    assert disks[0].read_ops == 3 and disks[0].write_bytes == 4096 and disks[0].read_ns == 0

    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield from metrics._disk_families(disks)

    registry = CollectorRegistry()
    registry.register(One())
    text = generate_latest(registry).decode()
    assert 'instance_runner_disk_read_operations_total{disk="disk0"} 3.0' in text
    assert 'instance_runner_disk_written_bytes_total{disk="disk0"} 4096.0' in text
