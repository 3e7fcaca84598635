"""Runs as a pod's PID 1 (under podsim) and talks to the controller as that pod would:
`probe` sends hostile requests and prints each answer; `bench` times registrations.

`tenant` runs in an unprivileged pod, as a VM pod's QEMU would after an escape, and tries
to reach another pod: each attempt's outcome is printed.

Usage: rpc_probe.py probe SOCKET OTHER_POD_UID OTHER_POD_CPUS
       rpc_probe.py bench SOCKET ROUNDS CONCURRENCY
       rpc_probe.py tenant SOCKET VICTIM_UID VICTIM_QEMU_PID VICTIM_VCPU_TID (node PIDs)
"""

from __future__ import annotations

import errno
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: each costs seconds under nested emulation
    from runner import kube


def own_pod() -> kube.PodCgroup:
    from runner import kube

    return kube.parse_pod_cgroup(kube.own_cgroup_path(Path("/proc/self/cpuset").read_text(), None))


def exchange(path: str, payload: bytes, timeout: float = 10) -> dict | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        data = b""
    finally:
        s.close()
    return json.loads(data) if data.strip() else None


def request(method: str, params: object) -> bytes:
    return (
        json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}) + "\n"
    ).encode()


def probe(path: str, other_uid: str, other_cpus: str) -> None:
    me = own_pod()
    mine = Path(f"/sys/fs/cgroup{me.path}/cpuset.cpus").read_text().strip()
    cases = {
        "own registration": request("registerCgroup", {"uuid": me.pod_uid, "cpuset": mine}),
        "idempotent again": request("registerCgroup", {"uuid": me.pod_uid, "cpuset": mine}),
        "another pod's uid": request("registerCgroup", {"uuid": other_uid, "cpuset": other_cpus}),
        "another pod's cpuset": request(
            "registerCgroup", {"uuid": me.pod_uid, "cpuset": other_cpus}
        ),
        "outside the node": request("registerCgroup", {"uuid": me.pod_uid, "cpuset": "0-63"}),
        "deregister another pod": request("deregisterCgroup", {"uuid": other_uid}),
        "own deregistration": request("deregisterCgroup", {"uuid": me.pod_uid}),
    }
    for name, payload in cases.items():
        print(json.dumps({"case": name, "answer": exchange(path, payload)}), flush=True)


def tenant(path: str, victim: str, qemu: int, vcpu_tid: int) -> None:
    """As a pod's own process. In a private cgroup namespace (exec'd into a VM pod that is
    not privileged, whose runner registered it already) the pod is the one the environment
    names, and its own registration is not asked again."""
    from runner import kube

    exec_d = "INSTANCE_RUNNER_POD_UID" in os.environ
    if exec_d:
        me = kube.in_namespace(os.environ["INSTANCE_RUNNER_POD_UID"])
        mine = Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text().strip()
    else:
        me = own_pod()
        mine = Path(f"/sys/fs/cgroup{me.path}/cpuset.cpus").read_text().strip()
    cpu = int(mine.split(",")[0].split("-")[0])

    def write(path: str, text: str) -> str:
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            return errno.errorcode[e.errno or 0]
        return "written"

    def affinity(tid: int) -> str:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError as e:
            return errno.errorcode[e.errno or 0]
        return "set"

    def ask(method: str, params: dict) -> dict | None:
        return exchange(path, request(method, params))

    own = {"uuid": me.pod_uid}
    results = {
        # The host's cgroupfs: another pod's instance, float, kubepods.
        "write the victim's instance cgroup": write(
            f"/sys/fs/cgroup/instances/instance-{victim}/cgroup.threads", str(os.getpid())
        ),
        "write float's cpuset": write("/sys/fs/cgroup/instances/float/cpuset.cpus", mine),
        "write the victim's vCPU into our container": write(
            f"/sys/fs/cgroup{me.path}/cgroup.procs", str(vcpu_tid)
        ),
        "pin the victim's vCPU": affinity(vcpu_tid),
        "own registration": "skipped" if exec_d else ask("registerCgroup", {**own, "cpuset": mine}),
        "register the victim's CPUs": ask("registerCgroup", {"uuid": victim, "cpuset": "1-2"}),
        "move for the victim": ask("moveProcess", {"uuid": victim, "pid": 1, "to": "float"}),
        "read the victim's status": ask("instanceStatus", {"uuid": victim}),
        "move the victim's QEMU": ask("moveProcess", {**own, "pid": qemu, "to": "float"}),
        "move the victim's QEMU back": ask("moveProcess", {**own, "pid": qemu, "to": "container"}),
        "place the victim's vCPU": ask(
            "placeVcpus",
            {**own, "qemu": 1, "anchor": 1, "vcpus": [{"vcpu": 0, "tid": vcpu_tid, "cpu": cpu}]},
        ),
        "place the victim's QEMU": ask(
            "placeVcpus",
            {**own, "qemu": qemu, "anchor": 1, "vcpus": [{"vcpu": 0, "tid": vcpu_tid, "cpu": cpu}]},
        ),
        "place on the victim's CPU": ask(
            "placeVcpus",
            {**own, "qemu": 1, "anchor": 1, "vcpus": [{"vcpu": 0, "tid": 1, "cpu": 1}]},
        ),
    }
    if not exec_d:
        results["own deregistration"] = ask("deregisterCgroup", own)
    for name, answer in results.items():
        print(json.dumps({"case": name, "answer": answer}), flush=True)


async def bench(path: str, rounds: int, concurrency: int) -> None:
    import trio

    from runner import rpc

    me = own_pod()
    cpuset = Path(f"/sys/fs/cgroup{me.path}/cpuset.cpus").read_text().strip()
    params = rpc.RegisterParams(me.pod_uid, cpuset)

    async def register() -> float:
        start = time.perf_counter()
        await rpc.call(path, "registerCgroup", params, rpc.RegisterResult)
        return (time.perf_counter() - start) * 1000

    sequential = []  # each round: a fresh registration (cgroup created), then removed
    for _ in range(rounds):
        sequential.append(await register())
        await rpc.call(
            path, "deregisterCgroup", rpc.DeregisterParams(me.pod_uid), rpc.DeregisterResult
        )
    await register()
    concurrent: list[float] = []

    async def one() -> None:
        concurrent.append(await register())

    for _ in range(max(1, rounds // concurrency)):
        async with trio.open_nursery() as n:
            for _ in range(concurrency):
                n.start_soon(one)
    await rpc.call(path, "deregisterCgroup", rpc.DeregisterParams(me.pod_uid), rpc.DeregisterResult)

    def summary(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {
            "n": len(xs),
            "p50_ms": round(statistics.median(xs), 2),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 2),
            "max_ms": round(xs[-1], 2),
        }

    print(
        json.dumps(
            {
                "sequential_fresh": summary(sequential),
                f"concurrent_{concurrency}": summary(concurrent),
            }
        )
    )


def watch(path: str, out: str) -> None:
    """A second pod's view of the controller: a health call every 50 ms, each written as
    "<monotonic start> <seconds> <ok>" (the clock is the node's: the test reads the window)."""
    with open(out, "a", buffering=1) as f:
        while True:
            started = time.monotonic()
            try:
                answer = exchange(path, request("health", {}), timeout=5)
                ok = answer is not None and answer.get("result", {}).get("status") == "ok"
            except OSError:
                ok = False
            f.write(f"{started:.3f} {time.monotonic() - started:.4f} {int(ok)}\n")
            time.sleep(0.05)


# containerd's default capabilities (capability.h numbers): what an exec'd process keeps.
DEFAULT_CAPS = {0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31}
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38


def as_the_runtime_execs() -> None:
    """Keep the runtime's default capabilities alone: the bounding set, then the effective,
    permitted and inheritable sets (capset), with no_new_privs."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in set(range(last + 1)) - DEFAULT_CAPS:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
    mask = sum(1 << c for c in DEFAULT_CAPS)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0, mask >> 32, mask >> 32, 0)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")


def attack(name: str, path: str, *args: str) -> None:
    """One hostile tenant's attack, as root exec'd into its own unprivileged VM pod (its UID
    from the environment, as the runner has it); each outcome printed as a JSON line."""
    as_the_runtime_execs()
    import attacks  # beside this file

    for case, answer in getattr(attacks, name.replace("-", "_"))(path, *args):
        print(json.dumps({"case": case, "answer": answer}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        probe(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "tenant":
        tenant(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "attack":
        attack(sys.argv[2], sys.argv[3], *sys.argv[4:])
    else:
        import trio

        trio.run(bench, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
