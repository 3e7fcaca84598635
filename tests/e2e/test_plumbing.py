"""Guest plumbing end to end with a real Linux guest (images/guest), directly on this machine:
each test gets its own network namespace; the runner runs there with --isolation off (cgroups
are proven in the test VM). DHCP from the runner's dnsmasq, a virtiofs share, the console,
power-off, and the faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .netns import Netns, new_netns, unprivileged

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 for network namespaces",
    ),
]
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_NICE = 12, 21, 23


@pytest.mark.parametrize("as_pod", [False, True], ids=["privileged", "unprivileged"])
def test_lease_share_console_and_clean_power_off(
    netns: Netns, as_pod: bool, vm_pod_capabilities: list[str]
) -> None:
    """The whole plumbing, also with exactly the capabilities of the example VM pod (each is
    needed: without any one of them this fails): the lease, the read-write share (virtiofsd
    sandboxed in a chroot), the console, power-off."""
    prefix = unprivileged(vm_pod_capabilities) if as_pod else ()
    disk = netns.tmp / "data.raw"
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    console_log = netns.tmp / "console.log"
    user_data = netns.tmp / "user-data"
    user_data.write_text("#cloud-config\nhostname: e2e\n")
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl u@h"
    netns.start(
        netns.spec(
            "guest.write=ip.txt guest.seed=1",
            disks=[{"path": str(disk), "read_only": True}],
            console={"stdout": True, "log_file": str(console_log)},
            cloud_init={
                "user_data": str(user_data),
                "ssh_authorized_keys": [key],
                "instance_id": "i-0001",
            },
        ),
        prefix=prefix,
    )
    ready = netns.wait_console("GUEST-READY")
    # cloud-init's seed, as the guest finds it among its disks (and as blkid labels it).
    assert "GUEST-SEED instance-id=i-0001 keys=1 user-data=#cloud-config" in netns.console()
    seed = netns.tmp / "run" / "seed.iso"
    probe = subprocess.run(["blkid", "-o", "export", str(seed)], capture_output=True, text=True)
    assert "LABEL=cidata" in probe.stdout and "TYPE=iso9660" in probe.stdout, probe
    if prefix:  # ip netns exec and setpriv exec: the runner is the process we started
        assert netns.proc is not None
        status = Path(f"/proc/{netns.proc.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        caps = int(fields["CapEff"], 16)
        assert not caps & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_NICE) and caps & 1 << CAP_NET_ADMIN
        assert fields["NoNewPrivs"].strip() == "1"
        argv = Path(f"/proc/{netns.process('virtiofsd')}/cmdline").read_bytes().split(b"\0")
        assert b"sandbox=chroot" in b" ".join(argv)
    # Exactly the leased address; the gateway the runner gave the tap answers pings.
    assert ready == "[e2e] GUEST-READY ip=10.0.2.15 gw=10.0.2.1 ping=ok read=hello from the host"
    assert (netns.share / "ip.txt").read_text() == "10.0.2.15\n"  # read-write share
    state = json.loads((netns.tmp / "run" / "ready").read_text())
    assert state["isolation"] == "off" and state["nics"][0]["ip"] == "10.0.2.15"
    assert netns.devices() == ["lo", "tap0"]
    qemu_args = next(e["argv"] for e in netns.logs() if e["event"] == "qemu-started")
    assert f"if=none,id=disk0,file={disk},format=raw,cache=writeback,readonly=on" in qemu_args
    assert netns.finish() == 0
    assert "GUEST-READY ip=10.0.2.15" in console_log.read_text()  # the log file, unprefixed
    assert "[e2e] GUEST-POWEROFF" in netns.console()  # the guest's own clean power-off
    events = netns.logs()
    assert any(e["event"] == "qemu-stopped" and e.get("how") == "guest power-off" for e in events)
    shutdown = [e for e in events if e["event"] == "qemu-event" and e["name"] == "SHUTDOWN"]
    assert shutdown and shutdown[0]["data"]["guest"] is True
    assert any(e["event"] == "isolation-off" and e["level"] == "warning" for e in events)
    netns.assert_nothing_left()
    assert not seed.exists()


def plumbing_works(ns: Netns, prefix: tuple[str, ...]) -> bool:
    """The guest leases its address, writes the share, and powers off; the runner exits 0
    and leaves nothing in its namespace."""
    ns.start(ns.spec("guest.write=ip.txt"), prefix=prefix)
    try:
        ns.wait_console("GUEST-READY", timeout=60)  # returns early if the runner exits
    except AssertionError:
        return False
    written = ns.share / "ip.txt"
    if not written.exists() or written.read_text() != "10.0.2.15\n":
        return False
    return ns.finish() == 0 and "GUEST-POWEROFF" in ns.console() and ns.pids() == []


@pytest.mark.slow
def test_each_capability_of_the_vm_pod_is_needed(
    tmp_path: Path, guest_image: Path, vm_pod_capabilities: list[str]
) -> None:
    """deploy/example-vm.yaml keeps no capability it could do without: with any one of them
    dropped, the plumbing (with a NIC and a share) breaks."""
    works = {}
    for cap in vm_pod_capabilities:
        with new_netns(tmp_path / cap, guest_image) as ns:
            works[cap] = plumbing_works(
                ns, unprivileged([c for c in vm_pod_capabilities if c != cap])
            )
    assert not any(works.values()), [c for c, ok in works.items() if ok]
    with new_netns(tmp_path / "all", guest_image) as ns:
        assert plumbing_works(ns, unprivileged(vm_pod_capabilities))


def read_only_volume(source: Path) -> tuple[str, ...]:
    """What kubelet makes of a volume mounted with readOnly: true: a read-only bind mount of
    it in the container's mount namespace, made before the container's process runs."""
    return (
        *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c"),
        'mount --bind -o ro "$0" "$0" && exec "$@"',
        str(source),
    )


@pytest.mark.parametrize(
    "as_pod", [False, True], ids=["privileged", "unprivileged-read-only-volume"]
)
def test_read_only_share_is_enforced(
    netns: Netns, as_pod: bool, vm_pod_capabilities: list[str]
) -> None:
    """Privileged: the runner bind-mounts the source read-only for virtiofsd. Unprivileged:
    it cannot (no CAP_SYS_ADMIN: `unshare --mount` would fail, and with it the start), and
    serves a source the pod has on a read-only mount as it is."""
    spec = netns.spec(
        "guest.write=ip.txt",
        shares=[{"source": str(netns.share), "tag": "data", "read_only": True}],
    )
    as_is = (*read_only_volume(netns.share), *unprivileged(vm_pod_capabilities))
    netns.start(spec, prefix=as_is if as_pod else ())
    line = netns.wait_console("GUEST-ERROR")
    assert "cannot write ip.txt" in line
    assert not (netns.share / "ip.txt").exists()
    assert netns.finish(sig=None) == 0  # the guest powered itself off
    netns.assert_nothing_left()


def test_a_writable_mount_below_a_read_only_share_is_refused_without_sys_admin(
    netns: Netns, vm_pod_capabilities: list[str]
) -> None:
    """A read-only volume with a writable one mounted inside it: served as it is, the guest
    could write there. An unprivileged pod cannot hide it with a bind mount: one line."""
    (netns.share / "scratch").mkdir()
    volumes = (
        *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c"),
        'mount --bind -o ro "$0" "$0" && mount -t tmpfs scratch "$0/scratch" && exec "$@"',
        str(netns.share),
    )
    spec = netns.spec(shares=[{"source": str(netns.share), "tag": "data", "read_only": True}])
    netns.start(spec, prefix=(*volumes, *unprivileged(vm_pod_capabilities)))
    assert netns.finish(sig=None) == 1
    (error,) = [e for e in netns.logs() if e["level"] == "error"]
    assert error["event"] == "startup-failed"
    assert f"{os.path.realpath(netns.share)}/scratch is a writable mount" in error["error"]
    assert "readOnly: true" in error["error"]
    assert not any(e["event"] == "qemu-started" for e in netns.logs())
    netns.assert_nothing_left()


def test_killed_dnsmasq_is_restarted_and_the_guest_runs_on(netns: Netns) -> None:
    netns.start(netns.spec())
    netns.wait_console("GUEST-READY")
    first = netns.process("dnsmasq")
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            second = netns.process("dnsmasq")
            if second != first:
                break
        except AssertionError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("dnsmasq was not restarted")
    assert any(e["event"] == "dnsmasq-restart" for e in netns.logs())
    assert netns.proc is not None and netns.proc.poll() is None
    assert netns.finish() == 0
    assert "[e2e] GUEST-POWEROFF" in netns.console()
    netns.assert_nothing_left()


def test_killed_virtiofsd_breaks_the_instance(netns: Netns) -> None:
    netns.start(netns.spec())
    netns.wait_console("GUEST-READY")
    os.kill(netns.process("virtiofsd"), signal.SIGKILL)
    assert netns.finish(sig=None) == 1
    errors = [e for e in netns.logs() if e["level"] == "error"]
    assert [e["event"] for e in errors] == ["instance-broken"]
    netns.assert_nothing_left()


def test_guest_ignoring_the_power_button_is_quit(netns: Netns) -> None:
    netns.start(netns.spec("guest.ignore_power=1"), "--shutdown-timeout", "2")
    netns.wait_console("GUEST-READY")
    start = time.monotonic()
    assert netns.finish() == 124
    assert 2 <= time.monotonic() - start < 2 + 3 + 3
    assert "GUEST-IGNORING-POWER-BUTTON" in netns.console()
    netns.assert_nothing_left()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"disks": [{"path": "/nonexistent/disk.img"}]}, "/nonexistent/disk.img does not exist"),
        ({"shares": [{"source": "/nonexistent/dir", "tag": "data"}]}, "is not a directory"),
        (
            {"nics": [{"mode": "tap", "ip": "10.0.2.15", "mac": "zz:54:00:12:34:56"}]},
            "must be a unicast address",
        ),
        ({"nics": [{"mode": "tap", "ip": "10.0.2.999"}]}, "is not an IPv4 address"),
        ({"nics": [{"mode": "tap", "ip": "10.0.2.15", "tap": "taken0"}]}, "already exists"),
    ],
)
def test_refusals_leave_nothing(netns: Netns, fields: dict[str, object], message: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns.name, "ip", "tuntap", "add", "taken0", "mode", "tap"],
        check=True,
    )
    netns.start(netns.spec(**fields))
    assert netns.finish(sig=None) == 1
    errors = [e for e in netns.logs() if e["level"] == "error"]
    assert len(errors) == 1 and message in errors[0]["error"], errors
    assert netns.pids() == []
    assert netns.devices() == ["lo", "taken0"]  # ours untouched, nothing of the runner's


def test_sigterm_after_the_plumbing_leaves_nothing(netns: Netns) -> None:
    netns.start(netns.spec(), "--pause-before", "qemu")
    paused = netns.tmp / "run" / "paused"
    deadline = time.monotonic() + 30
    while not paused.exists():
        assert (
            time.monotonic() < deadline and netns.proc is not None and netns.proc.poll() is None
        ), netns.err.read_text()
        time.sleep(0.05)
    netns.started = netns.descendants()  # dnsmasq and virtiofsd are up by now
    assert netns.devices() == ["lo", "tap0"] and len(netns.started) >= 2
    assert netns.finish() == 128 + signal.SIGTERM
    netns.assert_nothing_left()


def test_qemu_failing_at_start_leaves_nothing(netns: Netns) -> None:
    netns.start(netns.spec(extra_args=["-no-such-option"]))
    assert netns.finish(sig=None) == 1
    errors = [e for e in netns.logs() if e["level"] == "error"]
    assert len(errors) == 1 and "QEMU exited during start-up" in errors[0]["error"], errors
    assert "-no-such-option" in errors[0]["error"]
    netns.assert_nothing_left()
