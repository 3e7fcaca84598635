"""What a hostile tenant tries against the node controller, from inside its own unprivileged
VM pod (root, the runtime's default capabilities, its own PID and cgroup namespaces). Run by
rpc_probe.py `attack NAME SOCKET [ARGS]`; each attack yields (case, outcome) pairs. The test
(test_tenants.py) checks what the node saw meanwhile."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rpc_probe import exchange, request

Outcome = Iterator[tuple[str, object]]


def me() -> str:
    return os.environ["INSTANCE_RUNNER_POD_UID"]


def my_cpus() -> list[int]:
    from runner import cpus

    return sorted(cpus.parse(Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text()))


def ask(path: str, method: str, params: object, timeout: float = 10) -> dict:
    started = time.monotonic()
    try:
        answer = exchange(path, request(method, params), timeout=timeout)
    except OSError as e:
        answer = {"oserror": errno.errorcode.get(e.errno or 0, str(e))}
    return {"answer": answer, "seconds": round(time.monotonic() - started, 3)}


def code(outcome: dict) -> int | None:
    answer = outcome["answer"] or {}
    return answer.get("error", {}).get("code")


def swept() -> None:
    """Until the controller has moved us out of the container cgroup (in our cgroup namespace
    it is "/"; float shows as a path above it)."""
    while Path("/proc/self/cgroup").read_text().strip() == "0::/":
        time.sleep(0.1)


def comm(path: str, seconds: str = "300") -> Outcome:
    """A process named with bytes that are not UTF-8, in the container cgroup of a kept pod,
    and connecting so (identify() reads its /proc at accept)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, b"\xff\xfe\xfd", 0, 0, 0)  # PR_SET_NAME
    yield "comm", Path("/proc/self/comm").read_bytes().rstrip(b"\n").hex()
    status = Path("/proc/self/status").read_bytes().splitlines()  # its Name is not UTF-8
    yield "caps", next(x for x in status if x.startswith(b"CapEff:")).split()[1].decode()
    yield "health", ask(path, "health", {})
    yield "sleeping", True
    time.sleep(float(seconds))


def cpu_range(path: str) -> Outcome:
    for cpuset in ("0-50000000", "0-4294967295:1/4294967295", "0-4294967295", "1-2,0-3,0-3"):
        outcome = ask(path, "registerCgroup", {"uuid": me(), "cpuset": cpuset})
        yield cpuset, {"code": code(outcome), "seconds": outcome["seconds"]}


def decoder(path: str, count: str = "30") -> Outcome:
    """Lines just under 64 KiB of empty vCPU objects, all at once: each once cost the event
    loop seconds before any identity check."""
    doc = {"jsonrpc": "2.0", "method": "placeVcpus", "id": 1}
    vcpus = ",".join(["{}"] * 21000)
    line = (
        json.dumps(doc)[:-1]
        + f', "params": {{"uuid": "{me()}", "qemu": 1, "anchor": 1, "vcpus": [{vcpus}]}}}}\n'
    ).encode()
    assert len(line) < 64 * 1024, len(line)
    results: list[tuple[int | None, int, float]] = []

    def one() -> None:
        started = time.monotonic()
        try:
            answer = exchange(path, line, timeout=30) or {}
        except OSError:
            answer = {}
        reply = len(json.dumps(answer, separators=(",", ":"))) if answer else 0
        results.append((answer.get("error", {}).get("code"), reply, time.monotonic() - started))

    threads = [threading.Thread(target=one) for _ in range(int(count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield "codes", sorted({c for c, _, _ in results if c is not None})
    yield "answered", sum(1 for c, _, _ in results if c is not None)
    yield "largest reply", max(n for _, n, _ in results)
    yield "slowest", round(max(s for _, _, s in results), 3)


def peer_gone(path: str, victim: str) -> Outcome:
    """A child that asks, and exits before the controller looks at who asked; reaped, its
    PID free for anyone."""
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(request("deregisterCgroup", {"uuid": victim}))
        os._exit(0)
    os.waitpid(pid, 0)
    yield "asked and reaped", pid


def socket_dir(path: str) -> Outcome:
    """The socket every pod on the node connects to: unlink it, bind another in its place."""
    try:
        os.unlink(path)
        yield "unlink", "done"
    except OSError as e:
        yield "unlink", errno.errorcode.get(e.errno or 0)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path + ".evil")
        yield "bind beside it", "done"
    except OSError as e:
        yield "bind beside it", errno.errorcode.get(e.errno or 0)
    finally:
        s.close()
    yield "health", code(ask(path, "health", {})) or "ok"


def fork_bomb(path: str, most: str = "20000") -> Outcome:
    """Once swept to float: fork until the kernel says no. The children wait on a pipe and go
    when it closes."""
    swept()
    r, w = os.pipe()
    forked, why = 0, "none"
    while forked < int(most):
        try:
            pid = os.fork()
        except OSError as e:
            why = errno.errorcode.get(e.errno or 0, str(e))
            break
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        forked += 1
    yield "forked", forked
    yield "stopped by", why
    time.sleep(2)  # the test reads pids.current meanwhile
    os.close(w)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    yield "reaped", True


def spinner(path: str, count: str = "8", seconds: str = "12") -> Outcome:
    """Once swept to float: `count` processes spinning for `seconds`."""
    swept()
    yield "swept", True
    children = []
    for _ in range(int(count)):
        pid = os.fork()
        if pid == 0:
            end = time.monotonic() + float(seconds)
            while time.monotonic() < end:
                pass
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    yield "spun", int(count)


def realtime(path: str) -> Outcome:
    """SCHED_FIFO 99 for its own vCPU, and two vCPUs on one thread."""
    cpu, other = my_cpus()[:2]
    fifo = [{"vcpu": 0, "tid": 1, "cpu": cpu, "priority": 99}]
    yield (
        "fifo 99",
        code(ask(path, "placeVcpus", {"uuid": me(), "qemu": 1, "anchor": 1, "vcpus": fifo})),
    )
    fifo1 = [{"vcpu": 0, "tid": 1, "cpu": cpu, "priority": 1}]
    yield (
        "fifo 1",
        code(ask(path, "placeVcpus", {"uuid": me(), "qemu": 1, "anchor": 1, "vcpus": fifo1})),
    )
    twice = [{"vcpu": 0, "tid": 1, "cpu": cpu}, {"vcpu": 1, "tid": 1, "cpu": other}]
    yield (
        "one thread twice",
        code(ask(path, "placeVcpus", {"uuid": me(), "qemu": 1, "anchor": 1, "vcpus": twice})),
    )


def connections(path: str, cap: str = "8") -> Outcome:
    """Every connection a pod may hold, held with a request a second; then one more."""
    held = []
    for _ in range(int(cap)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        held.append(s)
    answered = 0
    for _ in range(3):
        for s in held:
            s.sendall(request("health", {}))
            answered += b'"ok"' in s.recv(4096)
        time.sleep(1)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(5)
    extra.connect(path)
    try:
        extra.sendall(request("health", {}))
        got = extra.recv(4096)
        yield "one more", "refused" if not got else got.decode()[:80]
    except (ConnectionResetError, BrokenPipeError):
        yield "one more", "refused"  # closed with our request unread
    except OSError as e:
        yield "one more", errno.errorcode.get(e.errno or 0)
    finally:
        extra.close()
    yield "held answered", answered
    for s in held:
        s.close()
    time.sleep(1.5)  # the controller sees them closed
    # A connection that never says anything: closed after the first-request deadline.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.settimeout(10)
    silent.connect(path)
    started = time.monotonic()
    silent.recv(1)
    yield "silent closed after", round(time.monotonic() - started, 1)
    silent.close()


def notification(path: str) -> Outcome:
    """Requests without an id: never answered, so the connection ends; a long method name."""
    for size in (5000, 60000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        s.sendall((json.dumps({"jsonrpc": "2.0", "method": "n" * size}) + "\n").encode())
        try:
            got = s.recv(4096)
            yield f"method of {size}", "closed" if not got else json.loads(got)["error"]["code"]
        except OSError as e:
            yield f"method of {size}", errno.errorcode.get(e.errno or 0)
        finally:
            s.close()


def who_knows(path: str) -> Outcome:
    yield "listInstances", code(ask(path, "listInstances", {}))
    yield "health", (ask(path, "health", {})["answer"] or {}).get("result")
    status = (ask(path, "instanceStatus", {"uuid": me()})["answer"] or {}).get("result") or {}
    yield "own status", sorted(status.get("pressure", {}))


def register(path: str, gate: str) -> Outcome:
    """PID 1 of a fresh pod: once `gate` exists, register its own CPUs; then wait for
    `gate`.done before leaving (the node puts things back meanwhile)."""
    yield "waiting", True
    while not Path(gate).exists():
        time.sleep(0.1)
    cpuset = Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text().strip()
    outcome = ask(path, "registerCgroup", {"uuid": me(), "cpuset": cpuset})
    yield "code", code(outcome)
    yield "message", ((outcome["answer"] or {}).get("error") or {}).get("message", "")[:120]
    while not Path(gate + ".done").exists():
        time.sleep(0.1)


def register_then_move(path: str, gate: str) -> Outcome:
    """PID 1 of a fresh pod, with an anchor (a container cgroup with no process left is
    removed, as systemd removes a scope): register, wait for `gate` (the controller restarts
    meanwhile), then ask to be moved to float and back, and deregister."""
    anchor = os.fork()
    if anchor == 0:
        time.sleep(3600)
        os._exit(0)
    cpuset = ",".join(str(c) for c in my_cpus())
    yield "register", code(ask(path, "registerCgroup", {"uuid": me(), "cpuset": cpuset}))
    while not Path(gate).exists():
        time.sleep(0.1)
    yield "to float", ask(path, "moveProcess", {"uuid": me(), "pid": 1, "to": "float"})["answer"]
    yield "back", ask(path, "moveProcess", {"uuid": me(), "pid": 1, "to": "container"})["answer"]
    yield "deregister", ask(path, "deregisterCgroup", {"uuid": me()})["answer"]
    os.kill(anchor, 9)
    os.waitpid(anchor, 0)
