"""The runner's metrics and probes decided from plain samples, rendered by prometheus_client
and parsed back by its own parser; /proc and PSI texts parsed as the kernel writes them."""

from __future__ import annotations

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from runner import httpd, rpc
from runner.node import cgroupfs, procfs
from runner.node.cgroupfs import Pressure
from runner.node.pinning import KeptCounts
from runner.run import metrics
from runner.run.metrics import Sample, VcpuSample

SAMPLE = Sample(
    name="vm",
    pod_uid="0b0e",
    isolation="on",
    mode="controller",
    guest_status="running",
    vcpus=(
        VcpuSample(0, 2, run_ns=3_000_000_000, delay_ns=1_500_000, involuntary=7, placed=True),
        VcpuSample(1, 3, run_ns=1_000_000_000, delay_ns=0, involuntary=0, placed=False),
    ),
    pressure={"instance": Pressure(250, 100), "float": Pressure(1_000_000, None)},
    kept=KeptCounts(drifts=2, repins=1, moved_to_float=3, evicted=5),
    orphans_reaped=4,
    restarts={"anchor": 1, "dnsmasq-vm0": 2},
    step_seconds={"anchor": 0.01, "pin": 0.02},
    running_after=1.25,
)


def scrape(sample: Sample) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {labels -> value}, through the library's own exposition and parser."""

    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield from metrics.families(sample)

    registry = CollectorRegistry()
    registry.register(One())
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_every_metric_with_its_labels() -> None:
    m = scrape(SAMPLE)
    vcpu0 = (("cpu", "2"), ("vcpu", "0"))
    vcpu1 = (("cpu", "3"), ("vcpu", "1"))
    assert m["instance_runner_vcpu_delay_seconds_total"] == {vcpu0: 0.0015, vcpu1: 0.0}
    assert m["instance_runner_vcpu_seconds_total"] == {vcpu0: 3.0, vcpu1: 1.0}
    assert m["instance_runner_vcpu_involuntary_switches_total"] == {vcpu0: 7, vcpu1: 0}
    assert m["instance_runner_vcpu_placement_ok"] == {vcpu0: 1, vcpu1: 0}
    assert m["instance_runner_cpu_pressure_waiting_seconds_total"] == {
        (("cgroup", "float"),): 1.0,
        (("cgroup", "instance"),): 0.00025,
    }
    # No "full" line (kernels before 5.13): no sample, rather than a false 0.
    assert m["instance_runner_cpu_pressure_stalled_seconds_total"] == {
        (("cgroup", "instance"),): 0.0001
    }
    assert m["instance_runner_vcpu_repins_total"] == {(): 1}
    assert m["instance_runner_vcpu_drifts_total"] == {(): 2}
    assert m["instance_runner_moved_to_float_total"] == {
        (("from", "container"),): 3,
        (("from", "instance"),): 5,
    }
    assert m["instance_runner_orphans_reaped_total"] == {(): 4}
    assert m["instance_runner_child_restarts_total"] == {
        (("child", "anchor"),): 1,
        (("child", "dnsmasq-vm0"),): 2,
    }
    assert m["instance_runner_startup_step_seconds"] == {
        (("step", "anchor"),): 0.01,
        (("step", "pin"),): 0.02,
    }
    assert m["instance_runner_startup_seconds"] == {(): 1.25}
    status = m["instance_runner_guest_status"]
    assert {dict(k)["status"] for k, v in status.items() if v == 1} == {"running"}
    assert {dict(k)["status"] for k in status} == set(metrics.GUEST_STATES)
    assert m["instance_runner_info"] == {
        (("isolation", "on"), ("mode", "controller"), ("name", "vm"), ("pod_uid", "0b0e")): 1
    }


def test_unpinned_vcpus_have_an_empty_cpu_label() -> None:
    sample = Sample(
        "vm", "", "off", "embedded", "paused", vcpus=(VcpuSample(0, None, 1, 2, 3, False),)
    )
    m = scrape(sample)
    assert m["instance_runner_vcpu_delay_seconds_total"] == {(("cpu", ""), ("vcpu", "0")): 2e-9}
    assert "instance_runner_startup_seconds" not in m


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "some avg10=0.00 avg60=0.12 avg300=0.00 total=3527\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=1203\n",
            Pressure(3527, 1203),
        ),
        ("some avg10=1.00 avg60=0.00 avg300=0.00 total=42\n", Pressure(42, None)),
    ],
)
def test_pressure_files(text: str, expected: Pressure) -> None:
    assert cgroupfs.parse_pressure(text) == expected


def test_a_pressure_file_without_totals_is_refused() -> None:
    with pytest.raises(ValueError, match="no 'some"):
        cgroupfs.parse_pressure("")


def test_health_fails_on_a_dead_or_silent_monitor() -> None:
    assert metrics.healthz({}, {}) == (200, "ok\n")
    code, text = metrics.healthz({"verify": "OSError: gone"}, {})
    assert code == 503 and "verify failed: OSError: gone" in text
    code, text = metrics.healthz({}, {"verify": 12.4})
    assert code == 503 and "silent for 12 s" in text


@pytest.mark.parametrize(
    ("phase", "status", "vcpus", "isolated", "code"),
    [
        ("pin", "prelaunch", SAMPLE.vcpus[:1], True, 503),  # before cont
        ("running", "running", SAMPLE.vcpus[:1], True, 200),
        ("running", "running", SAMPLE.vcpus, True, 503),  # vCPU 1 off its CPU
        ("running", "running", (), True, 503),  # nothing known is nothing placed
        ("running", "paused", SAMPLE.vcpus[:1], True, 503),  # stopped by a QMP client
        ("running", "running", SAMPLE.vcpus, False, 200),  # isolation off: nothing to place
        ("stopping", "running", SAMPLE.vcpus[:1], True, 503),
    ],
)
def test_ready_only_when_running_and_placed(
    phase: str, status: str, vcpus: tuple[VcpuSample, ...], isolated: bool, code: int
) -> None:
    assert metrics.readyz(phase, status, vcpus, isolated)[0] == code


def test_a_failing_route_answers_500_and_the_listener_stays() -> None:
    def broken() -> httpd.Reply:
        raise RuntimeError("bug")

    answer = trio.run(httpd.respond, b"GET /metrics HTTP/1.1\r\n\r\n", {"/metrics": broken})
    assert answer.startswith(b"HTTP/1.1 500 ")


def test_a_route_names_its_content_type() -> None:
    routes: dict[str, httpd.Route] = {"/metrics": lambda: (200, "a 1\n", "text/x; v=1")}
    answer = trio.run(httpd.respond, b"GET /metrics HTTP/1.1\r\n\r\n", routes)
    assert b"Content-Type: text/x; v=1\r\n" in answer and answer.endswith(b"\r\n\r\na 1\n")


STAT = (
    "4242 (CPU 0/KVM) S 4200 4200 1 0 -1 4194624 130 0 0 0 25 17 0 0 -2 0 7 0 1234 "
    "1000000 100 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 -1 3 1 1 0 0 0"
)


def test_stat_fields_survive_a_thread_name_with_spaces() -> None:
    st = procfs.parse_stat(STAT)
    assert (st.comm, st.ppid, st.ticks, st.last_cpu) == ("CPU 0/KVM", 4200, 42, 3)
    assert (st.policy, st.rt_priority) == ("fifo", 1)
    assert not st.kernel


def test_a_kernel_thread_is_told_by_its_flags() -> None:
    # kvm-nx-lpage-recovery as 6.1 shows it: PF_KTHREAD (0x00200000) is set in field 9.
    text = "812 (kvm-nx-lpage-re) S 2 0 0 0 -1 2129984 0 0 0 0 0 3 0 0 20 0 1 0 4321 " + " ".join(
        ["0"] * 30
    )
    assert procfs.parse_stat(text).kernel


def test_schedstat_and_status() -> None:
    assert procfs.parse_schedstat("123 456 7\n") == procfs.SchedStat(123, 456, 7)
    status = procfs.parse_status("Name:\tqemu\nnonvoluntary_ctxt_switches:\t9\n")
    assert status["nonvoluntary_ctxt_switches"] == "9"
    assert procfs.cgroup_of("0::/instances/float\n") == "/instances/float"
    assert procfs.cgroup_of("1:cpuset:/\n") == ""


def test_what_the_controller_read_comes_first_and_counts_are_whoever_keeps() -> None:
    own = KeptCounts(drifts=1, repins=1)
    local = {"instance": Pressure(5, 5)}
    remote = rpc.StatusResult(
        {"instance": Pressure(7, None), "float": Pressure(9, 1)},
        KeptCounts(drifts=3, repins=2, moved_to_float=4, evicted=1),
    )

    def never() -> dict[str, Pressure]:
        raise AssertionError("read locally although the controller answered")

    # Embedded: our keeper's counts, and our own reading.
    assert metrics.instance_view(True, own, lambda: local, None) == (local, own)
    # Controller mode: its reading and its counts, and ours not read at all.
    assert metrics.instance_view(False, own, never, remote) == (
        dict(remote.pressure),
        KeptCounts(drifts=3, repins=2, moved_to_float=4, evicted=1),
    )
    # It did not answer: our reading if we have one, and no counts rather than ours (zeros).
    assert metrics.instance_view(False, own, lambda: local, None) == (local, None)
    # It answered before placing the vCPUs: no counts yet.
    early = rpc.StatusResult({}, None)
    assert metrics.instance_view(False, own, never, early) == ({}, None)
