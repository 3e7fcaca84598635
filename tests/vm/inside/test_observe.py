"""The runner and the controller seen from outside, on a real kernel: /metrics scraped and
parsed by Prometheus's own parser, /readyz before and after `cont`, the counters moving when
the thing they count happens, and the vCPU run delay under an exec'd noisy neighbour with and
without isolation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .conftest import CG, Node, wait_for
from .pods import (
    FLOAT,
    INSTANCES,
    RUNNER,
    UNPRIVILEGED_POD,
    Daemon,
    RunnerPod,
    assert_nothing_left,
    container_of,
    events,
    float_of,
    host_vcpus,
    start_runner,
    task_cgroup,
    tasks,
    write_spec,
)

Metrics = dict[str, dict[tuple[tuple[str, str], ...], float]]
CONTAINER, INSTANCE = (("from", "container"),), (("from", "instance"),)
NOISE = "while :; do :; done"


def get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(address: str) -> Metrics:
    code, text = get(address, "/metrics")
    assert code == 200, text
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def spinning_disk(tmp: Path) -> Path:
    """A boot sector that spins for ever (`jmp $`): vCPU 0 is always runnable, so every moment
    it waits for a CPU shows as run delay. No OS: it starts in a second, even under TCG."""
    disk = tmp / "spin.img"
    sector = bytearray(512)
    sector[0:2] = b"\xeb\xfe"
    sector[510:512] = b"\x55\xaa"
    disk.write_bytes(bytes(sector) + bytes(1024 * 1024 - 512))  # SeaBIOS skips a tiny disk
    return disk


def exec_busy(rp: RunnerPod) -> subprocess.Popen[bytes]:
    """A busy process as `kubectl exec` makes one: in the pod's PID namespace and its container
    cgroup. The pod's PID 1 sees it (a process from outside shows as pid 0 there)."""
    procs = container_of(rp.pod.uid) / "cgroup.procs"
    return subprocess.Popen(
        [
            *("nsenter", "--target", str(rp.runner_pid()), "--pid", "--"),
            *("sh", "-c", f'echo $$ > "$0" && exec sh -c "{NOISE}"', str(procs)),
        ],
        start_new_session=True,
    )


def busy_child_in(hog: subprocess.Popen[bytes], cgroup: str) -> bool:
    """The busy process nsenter forked for `hog` runs, in `cgroup`."""
    try:
        children = Path(f"/proc/{hog.pid}/task/{hog.pid}/children").read_text().split()
        return bool(children) and all(
            Path(f"/proc/{c}/cgroup").read_text().strip() == f"0::{cgroup}"
            and Path(f"/proc/{c}/comm").read_text().strip() == "sh"
            for c in children
        )
    except OSError:
        return False


def kill(p: subprocess.Popen[bytes]) -> None:
    os.killpg(p.pid, signal.SIGKILL)  # nsenter and the busy child it forked
    p.wait()


def tgid_of(tid: int) -> int:
    return int(Path(f"/proc/{tid}/status").read_text().split("\nTgid:")[1].split()[0])


def comm_of(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()


def by_vcpu(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[int, float]:
    return {int(dict(k)["vcpu"]): v for k, v in samples.items()}


def test_readyz_fails_before_cont_and_health_answers_during_start_up(
    node: Node, tmp_path: Path
) -> None:
    address = "127.0.0.1:9471"
    rp = start_runner(node, tmp_path, "1-2", "--pause-before", "cont", "--metrics-address", address)
    wait_for(
        lambda: (rp.run_dir / "paused").exists() or rp.pod.proc.poll() is not None,
        timeout=180,
        what="the runner to pause before cont",
    )
    assert rp.pod.proc.poll() is None, rp.pod.proc.communicate()[1]
    code, text = get(address, "/readyz")
    assert code == 503 and "not running: cont" in text
    assert get(address, "/healthz") == (200, "ok\n")
    m = scrape(address)
    # Pinned, not yet running: placed, and QEMU's own word for a guest not started.
    assert set(by_vcpu(m["instance_runner_vcpu_placement_ok"]).values()) == {1}
    status = {dict(k)["status"]: v for k, v in m["instance_runner_guest_status"].items()}
    assert status["prelaunch"] + status["paused"] == 1 and status["running"] == 0
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, _err = rp.finish()
    assert code == 128 + signal.SIGTERM
    assert_nothing_left(rp.pod.uid)


def start_spinner(
    node: Node, tmp: Path, address: str, *args: str, cpus: str = "1-2", **pod: Any
) -> tuple[RunnerPod, dict]:
    spec = write_spec(tmp, vcpus=2, disks=[{"path": str(spinning_disk(tmp)), "format": "raw"}])
    rp = start_runner(
        node,
        tmp,
        cpus,
        "--metrics-address",
        address,
        "--shutdown-timeout",
        "0",  # no OS to answer the power button
        *args,
        spec=spec,
        **pod,
    )
    return rp, rp.wait_ready()


def inspect_from_inside(rp: RunnerPod) -> subprocess.CompletedProcess[str]:
    """In the pod's PID, mount and cgroup namespaces, as `kubectl exec` runs it (but left in
    the node's root cgroup: the pod's cgroupfs is read-only, and it would be swept anyway)."""
    return subprocess.run(
        [
            *("nsenter", "--target", str(rp.runner_pid()), "--pid", "--mount", "--cgroup"),
            *("--root", "--", RUNNER, "inspect", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def stop(rp: RunnerPod) -> str:
    rp.pod.proc.send_signal(signal.SIGTERM)
    code, err = rp.finish()
    assert code == 124, err  # QEMU told to quit: the boot sector ignores the power button
    return err


def test_a_running_instance_is_seen_whole(node: Node, tmp_path: Path) -> None:
    """Controller mode, as in production: an unprivileged pod in a cgroup namespace of its own
    (containerd's default on cgroup v2), which cannot read the node's cgroups. Every metric
    of the runner with its labels (what it cannot read, the controller reads for it), the
    counters moving when a vCPU is moved behind the runner's back, the controller's own
    metrics beside it, and inspect run from inside the pod."""
    daemon = Daemon(node, tmp_path)
    daemon.extra = ("--health-address", "127.0.0.1:9472")
    daemon.start()
    try:
        address = "127.0.0.1:9473"
        uid = str(uuid.uuid4())
        rp, ready = start_spinner(
            node,
            tmp_path,
            address,
            *("--controller-socket", str(daemon.socket)),
            uid=uid,
            podsim=UNPRIVILEGED_POD,
            # The default, which inspect finds from inside the pod with no option.
            default_run_dir=True,
            run_dir=Path("/run/instance-runner") / uid,
        )
        runner = rp.runner_pid()
        assert os.stat(f"/proc/{runner}/ns/cgroup").st_ino != os.stat("/proc/self/ns/cgroup").st_ino
        container = f"/{container_of(uid).relative_to(CG)}"
        assert ready["cgroup_namespace_root"] == container
        assert ready["instance_cgroup"].startswith("/..")  # as the runner sees it
        assert get(address, "/readyz") == (200, "ready\n")
        assert get(address, "/healthz") == (200, "ok\n")
        m = scrape(address)
        pinned = {v["vcpu"]: v["cpu"] for v in ready["vcpus"]}
        labels = {(("cpu", str(c)), ("vcpu", str(v))) for v, c in pinned.items()}
        for name in (
            "instance_runner_vcpu_delay_seconds_total",
            "instance_runner_vcpu_seconds_total",
            "instance_runner_vcpu_involuntary_switches_total",
            "instance_runner_vcpu_placement_ok",
        ):
            assert set(m[name]) == labels, name
        assert set(m["instance_runner_vcpu_placement_ok"].values()) == {1}
        assert by_vcpu(m["instance_runner_vcpu_seconds_total"])[0] > 0  # the spinning one
        for name in (
            "instance_runner_cpu_pressure_waiting_seconds_total",
            "instance_runner_cpu_pressure_stalled_seconds_total",
        ):
            assert {dict(k)["cgroup"] for k in m[name]} == {"instance", "float"}, name
        for name in ("instance_runner_orphans_reaped_total", "instance_runner_startup_seconds"):
            assert () in m[name], name
        # In controller mode the controller keeps the vCPUs placed: it counts, by pod, and
        # tells the runner at each scrape.
        assert m["instance_runner_vcpu_repins_total"] == {(): 0}
        ctl = "127.0.0.1:9472"
        pod = (("pod_uid", rp.pod.uid),)
        pod_from = {k: tuple(sorted(pod + v)) for k, v in (("c", CONTAINER), ("i", INSTANCE))}
        assert "instance_runner_child_restarts_total" not in m or all(
            v == 0 for v in m["instance_runner_child_restarts_total"].values()
        )
        steps = {dict(k)["step"] for k in m["instance_runner_startup_step_seconds"]}
        assert {"http", "anchor", "cgroups", "float", "qemu", "qmp", "pin", "cont"} <= steps
        status = {dict(k)["status"]: v for k, v in m["instance_runner_guest_status"].items()}
        assert status["running"] == 1 and sum(status.values()) == 1
        info = dict(next(iter(m["instance_runner_info"])))
        assert (info["mode"], info["pod_uid"]) == ("controller", rp.pod.uid)

        # A vCPU moved off its CPU behind the runner's back: counted, put back, placed again.
        vcpu0 = host_vcpus(rp, ready)[0]
        os.sched_setaffinity(vcpu0["tid"], set(pinned.values()))  # (the cpuset allows no other)
        wait_for(
            lambda: scrape(ctl)["instance_runner_controller_vcpu_repins_total"][pod] >= 1,
            timeout=30,
            what="the repin to be counted",
        )
        assert scrape(ctl)["instance_runner_controller_vcpu_drifts_total"][pod] >= 1
        m = scrape(address)
        assert m["instance_runner_vcpu_repins_total"][()] >= 1
        assert m["instance_runner_vcpu_drifts_total"][()] >= 1
        wait_for(
            lambda: set(scrape(address)["instance_runner_vcpu_placement_ok"].values()) == {1},
            timeout=10,
            what="the runner to see the vCPU placed again",
        )
        # A process exec'd into the container cgroup: swept to float, and counted.
        hog = exec_busy(rp)
        try:
            wait_for(
                lambda: (
                    scrape(ctl)["instance_runner_controller_moved_to_float_total"][pod_from["c"]]
                    >= 1
                ),
                timeout=30,
                what="the sweep to be counted",
            )
            (busy,) = Path(f"/proc/{hog.pid}/task/{hog.pid}/children").read_text().split()
            assert Path(f"/proc/{busy}/cgroup").read_text().strip() == f"0::{float_of(uid)}"
        finally:
            kill(hog)

        # A thread that is no vCPU written into the instance cgroup: back to float, counted.
        qemu = tgid_of(vcpu0["tid"])
        (io,) = [t for t in tasks(qemu) if comm_of(qemu, t).startswith("IO ")]
        (INSTANCES / f"instance-{rp.pod.uid}" / "cgroup.threads").write_text(str(io))
        wait_for(
            lambda: (
                scrape(ctl)["instance_runner_controller_moved_to_float_total"][pod_from["i"]] >= 1
            ),
            timeout=30,
            what="the eviction to be counted",
        )
        assert task_cgroup(qemu, io) == float_of(uid)
        assert not os.sched_getaffinity(io) & set(pinned.values())

        # inspect from inside the pod: its own instance, every cgroup by the node's name.
        r = inspect_from_inside(rp)
        assert r.returncode == 0, r.stdout + r.stderr
        (got,) = json.loads(r.stdout)["instances"]
        assert got["ok"] and (got["pod_uid"], got["seen_from"]) == (uid, "pod")
        assert got["instance_cgroup"] == f"/instances/instance-{uid}"
        assert got["float_cgroup"] == float_of(uid)
        assert got["container_cgroup"] == container and got["runner_pid"] == 1
        vcpus = [t for t in got["threads"] if t["role"] == "vcpu"]
        assert {t["vcpu"]: int(t["allowed_cpus"]) for t in vcpus} == pinned
        assert {t["cgroup"] for t in vcpus} == {f"/instances/instance-{uid}"}
        assert {t["cgroup"] for t in got["threads"] if t["role"] == "qemu-main"} == {float_of(uid)}

        c = scrape("127.0.0.1:9472")
        requests = {
            (dict(k)["method"], dict(k)["result"]): v
            for k, v in c["instance_runner_controller_requests_total"].items()
        }
        assert requests[("registerCgroup", "ok")] >= 1
        assert requests[("instanceStatus", "ok")] >= 1
        assert c["instance_runner_controller_instances"][()] == 1
        float_now = (FLOAT / "cpuset.cpus.effective").read_text().strip()
        assert float_now == "0,3" and c["instance_runner_controller_float_cpus"][()] == 2
        assert c["instance_runner_controller_reconcile_seconds_count"][()] >= 1
        assert c["instance_runner_controller_open_connections"][()] >= 0

        err = stop(rp)
        totals = {e["vcpu"]: e for e in events(err, "vcpu-totals")}
        assert sorted(totals) == [0, 1]
        assert totals[0]["cpu"] == pinned[0] and totals[0]["cpu_s"] > 0
        assert_nothing_left(rp.pod.uid)
        c = scrape("127.0.0.1:9472")
        requests = {
            (dict(k)["method"], dict(k)["result"]): v
            for k, v in c["instance_runner_controller_requests_total"].items()
        }
        assert requests[("deregisterCgroup", "ok")] >= 1
        assert c["instance_runner_controller_instances"][()] == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            assert daemon.stop() == 0


def test_a_noisy_neighbour_delays_vcpus_only_without_isolation(node: Node, tmp_path: Path) -> None:
    """Four busy processes exec'd into a 2-CPU pod whose vCPU 0 always wants its CPU: isolated,
    they are swept to the shared CPUs and vCPU 0 does not wait; with --isolation off they
    share its CPUs, and its run delay grows with the time they take. (Four: with fewer, the
    balancer may leave vCPU 0 a CPU of its own by chance.)"""
    window = 5.0
    growth: dict[str, float] = {}
    for mode, args in (("isolated", ()), ("off", ("--isolation", "off"))):
        work = tmp_path / mode
        work.mkdir()
        address = "127.0.0.1:9474"
        rp, _ready = start_spinner(node, work, address, *args)
        hogs = [exec_busy(rp) for _ in range(4)]
        try:
            # Each exec takes a while under nested emulation: the window opens once all four
            # are busy where they will stay (isolated: swept to float, else the container).
            home = (
                float_of(rp.pod.uid)
                if mode == "isolated"
                else "/" + str(container_of(rp.pod.uid).relative_to(CG))
            )
            wait_for(
                lambda hogs=hogs, home=home: all(busy_child_in(h, home) for h in hogs),
                timeout=60,
                what=f"the busy processes to be in {home}",
            )
            time.sleep(0.5)
            before = by_vcpu(scrape(address)["instance_runner_vcpu_delay_seconds_total"])[0]
            time.sleep(window)
            after = by_vcpu(scrape(address)["instance_runner_vcpu_delay_seconds_total"])[0]
        finally:
            for hog in hogs:
                kill(hog)
        growth[mode] = after - before
        print(f"{mode}: vCPU 0 waited {growth[mode]:.3f} s in {window:.0f} s")
        stop(rp)
        assert_nothing_left(rp.pod.uid)
    # Off: five busy threads on two CPUs, vCPU 0 waits half the window or more. Isolated: ~0.
    assert growth["off"] > 0.1 * window, growth
    assert growth["off"] > 10 * growth["isolated"], growth
    assert not list(INSTANCES.glob("instance-*"))
