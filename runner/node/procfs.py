"""Thin /proc reads of processes and threads. Parsing is pure (`parse_*`, tested on text);
the readers only open files. A thread that is gone raises OSError: callers decide."""

from __future__ import annotations

import os
import select
from pathlib import Path

import attrs

from runner import cpus
from runner.cpus import CpuSet

# /proc/<pid>/stat fields after "comm)": index 0 is field 3 (state) of proc(5).
_PPID, _FLAGS, _UTIME, _STIME, _PROCESSOR, _RT_PRIORITY, _POLICY = 1, 6, 11, 12, 36, 37, 38
_STARTTIME = 19
PF_KTHREAD = 0x00200000  # include/linux/sched.h
POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline"}


@attrs.frozen
class SchedStat:
    """/proc/<pid>/task/<tid>/schedstat: time on a CPU, time waiting on a run queue (the
    "CPU ready" / steal a guest feels), and the number of times it was given a CPU."""

    run_ns: int
    delay_ns: int
    timeslices: int


@attrs.frozen
class Stat:
    """What /proc/<pid>/task/<tid>/stat tells of one thread."""

    comm: str
    ppid: int
    ticks: int  # utime + stime, in clock ticks
    last_cpu: int
    policy: str
    rt_priority: int
    kernel: bool = False  # a kernel thread (PF_KTHREAD)


@attrs.frozen
class ThreadView:
    """One thread as /proc shows it at one moment."""

    pid: int
    tid: int
    comm: str
    cgroup: str
    allowed: CpuSet
    last_cpu: int
    policy: str
    rt_priority: int
    run_ns: int
    delay_ns: int
    involuntary: int


def parse_schedstat(text: str) -> SchedStat:
    run, delay, slices = text.split()[:3]
    return SchedStat(int(run), int(delay), int(slices))


def parse_stat(text: str) -> Stat:
    # comm may hold spaces and parentheses: it ends at the last ")".
    head, tail = text.rsplit(")", 1)
    f = tail.split()
    policy = int(f[_POLICY])
    return Stat(
        comm=head.split("(", 1)[1],
        ppid=int(f[_PPID]),
        ticks=int(f[_UTIME]) + int(f[_STIME]),
        last_cpu=int(f[_PROCESSOR]),
        policy=POLICIES.get(policy, str(policy)),
        rt_priority=int(f[_RT_PRIORITY]),
        kernel=bool(int(f[_FLAGS]) & PF_KTHREAD),
    )


def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def cgroup_of(text: str) -> str:
    """The cgroup v2 path in a /proc/<pid>/cgroup text ("" when it has none)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return ""


def read(path: str | Path) -> str:
    """A /proc, /sys or cgroupfs file as text. A process names itself with any bytes, and a
    cgroup may be named so: undecodable bytes become surrogate escapes, never an error, and a
    path read this way opens the same file again."""
    return Path(path).read_bytes().decode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """Text read by `read`, with undecodable bytes shown as U+FFFD: for a terminal."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def cgroup(pid: int | str, tid: int | None = None) -> str:
    """The cgroup v2 path of a process (or one of its threads), as its own namespace shows
    it; "" when it has none."""
    base = _task(int(pid), tid) if tid is not None else Path(f"/proc/{pid}")
    return cgroup_of(read(base / "cgroup"))


def _task(pid: int, tid: int) -> Path:
    return Path(f"/proc/{pid}/task/{tid}")


def schedstat(pid: int, tid: int) -> SchedStat:
    return parse_schedstat(read(_task(pid, tid) / "schedstat"))


def stat(pid: int, tid: int | None = None) -> Stat:
    base = _task(pid, tid) if tid is not None else Path(f"/proc/{pid}")
    return parse_stat(read(base / "stat"))


def involuntary_switches(pid: int, tid: int) -> int:
    return int(parse_status(read(_task(pid, tid) / "status"))["nonvoluntary_ctxt_switches"])


def tgid(tid: int) -> int:
    """The process a thread belongs to (cgroup.threads lists threads alone)."""
    return int(parse_status(read(f"/proc/{tid}/status"))["Tgid"])


def thread(pid: int, tid: int) -> ThreadView:
    """Everything about one thread; OSError if it went away while being read."""
    base = _task(pid, tid)
    st = parse_stat(read(base / "stat"))
    status = parse_status(read(base / "status"))
    sched = parse_schedstat(read(base / "schedstat"))
    return ThreadView(
        pid=pid,
        tid=tid,
        comm=st.comm,
        cgroup=cgroup_of(read(base / "cgroup")),
        allowed=cpus.parse(status["Cpus_allowed_list"]),
        last_cpu=st.last_cpu,
        policy=st.policy,
        rt_priority=st.rt_priority,
        run_ns=sched.run_ns,
        delay_ns=sched.delay_ns,
        involuntary=int(status["nonvoluntary_ctxt_switches"]),
    )


def threads(pid: int) -> list[int]:
    """The thread IDs of a process, its main thread first ([] once it is gone).

    The rest are sorted; after the PID counter wraps they may be lower than the main one's.
    """
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []
    return sorted(tids, key=lambda t: t != pid)


def processes() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def pid_namespace(pid: int | str) -> int:
    """The inode of a process's PID namespace: equal for every process of one pod."""
    return os.stat(f"/proc/{pid}/ns/pid").st_ino


def start_time(pid: int, tid: int | None = None) -> int | None:
    """When a process (or thread) started, in clock ticks since boot; None once it is gone.
    The same number read twice around other reads proves they were of the same one."""
    base = _task(pid, tid) if tid is not None else Path(f"/proc/{pid}")
    try:
        text = read(base / "stat")
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[_STARTTIME])


def rt_throttling() -> tuple[int, int]:
    """kernel.sched_rt_runtime_us and sched_rt_period_us (-1 runtime: throttling off)."""
    runtime = int(read("/proc/sys/kernel/sched_rt_runtime_us"))
    return runtime, int(read("/proc/sys/kernel/sched_rt_period_us"))


def exited(pidfd: int) -> bool:
    """A pidfd turns readable when its process has exited (while it has not, its PID is its
    own: nothing read under it can be another process's)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def cmdline(pid: int) -> list[str]:
    return printable(read(f"/proc/{pid}/cmdline")).split("\0")[:-1]
