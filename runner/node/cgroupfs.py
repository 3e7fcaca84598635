"""Thin cgroup v2 file operations. Paths are cgroup paths ("/instances/float"), resolved
against the mount point; errors name the file and the operation."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from runner import cpus
from runner.cpus import CpuSet
from runner.node import procfs


@attrs.frozen
class Pressure:
    """cpu.pressure totals, in microseconds: some = at least one task waited for a CPU,
    full = every non-idle task did at once."""

    some_us: int
    full_us: int | None  # the kernel reports "full" for CPU only since 5.13


def parse_pressure(text: str) -> Pressure:
    """A PSI file ("some avg10=0.00 avg60=0.00 avg300=0.00 total=123", "full ...")."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for field in fields:
            key, _, value = field.partition("=")
            if key == "total":
                totals[kind] = int(value)
    if "some" not in totals:
        raise ValueError(f"no 'some ... total=' line in {text!r}")
    return Pressure(totals["some"], totals.get("full"))


class CgroupError(Exception):
    """A cgroup operation failed; the message says which and why."""


class CgroupFS:
    def __init__(self, mount: str | Path = "/sys/fs/cgroup") -> None:
        self.mount = Path(mount)

    def dir(self, cgroup: str) -> Path:
        # In a private cgroup namespace, cgroups outside it read as "/../..": never a path
        # below the mount.
        if ".." in cgroup.split("/"):
            raise CgroupError(f"{cgroup} is outside this cgroup namespace's view")
        return self.mount / cgroup.lstrip("/")

    def relative(self, directory: str | Path) -> str:
        """The cgroup path of a directory below the mount ("/instances/float")."""
        rel = Path(directory).resolve().relative_to(self.mount.resolve())
        return "/" + str(rel) if str(rel) != "." else "/"

    def read(self, cgroup: str, name: str) -> str:
        path = self.dir(cgroup) / name
        try:
            return procfs.read(path)
        except OSError as e:
            raise CgroupError(f"cannot read {path}: {e.strerror}") from None

    def write(self, cgroup: str, name: str, value: str) -> None:
        path = self.dir(cgroup) / name
        try:
            # One write() per value: cgroupfs acts on each write separately.
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror} ({name})") from None

    def exists(self, cgroup: str) -> bool:
        try:
            return self.dir(cgroup).is_dir()
        except CgroupError:
            return False

    def check_v2_cpuset(self) -> None:
        """Refuse hosts where cpuset is not on a cgroup v2 hierarchy at the mount."""
        controllers = self.mount / "cgroup.controllers"
        if not controllers.exists():
            raise CgroupError(
                f"{self.mount} is not a cgroup v2 (unified) hierarchy: instance-runner needs a "
                "node booted with cgroup v2 only (systemd.unified_cgroup_hierarchy=1); "
                "to try it on this machine, run it inside scripts/testvm"
            )
        if "cpuset" not in procfs.read(controllers).split():
            raise CgroupError(
                f"the cpuset controller is not available in {self.mount} (bound to a cgroup v1 "
                "hierarchy?): instance-runner needs cpuset on cgroup v2"
            )

    def cpus(self, cgroup: str, effective: bool = True) -> CpuSet:
        return cpus.parse(
            self.read(cgroup, "cpuset.cpus.effective" if effective else "cpuset.cpus")
        )

    def enable(self, cgroup: str, controller: str) -> None:
        if controller not in self.read(cgroup, "cgroup.subtree_control").split():
            self.write(cgroup, "cgroup.subtree_control", f"+{controller}")

    def make_domain_root(self, cgroup: str) -> None:
        """Create `cgroup` (if needed) with cpuset enabled for its children; its parent must
        delegate cpuset to it."""
        parent = str(Path(cgroup).parent)
        self.enable(parent, "cpuset")
        try:
            self.dir(cgroup).mkdir(exist_ok=True)
        except OSError as e:
            raise CgroupError(f"cannot create {self.dir(cgroup)}: {e.strerror}") from None
        self.enable(cgroup, "cpuset")

    def make_threaded(self, cgroup: str, cpu_set: CpuSet | None, mems: CpuSet) -> None:
        """Create (or keep) a threaded child with these CPUs (None: its parent's) and memory
        nodes."""
        try:
            self.dir(cgroup).mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise CgroupError(f"cannot create {self.dir(cgroup)}: {e.strerror}") from None
        if self.read(cgroup, "cgroup.type").strip() != "threaded":
            self.write(cgroup, "cgroup.type", "threaded")
        if cpu_set is None:
            return
        self.set_cpus(cgroup, cpu_set)
        if mems:
            self.write(cgroup, "cpuset.mems", cpus.format(mems))

    def set_cpus(self, cgroup: str, cpu_set: CpuSet) -> None:
        if not cpu_set:
            raise CgroupError(f"refusing to write an empty cpuset to {cgroup}")
        self.write(cgroup, "cpuset.cpus", cpus.format(cpu_set))

    def spread_threads(self, cgroup: str, cpu_set: CpuSet) -> None:
        """Every thread of `cgroup` and of its children allowed on all of `cpu_set`. Needed
        after a cpuset grows: since 6.2 a thread keeps the affinity it was given, and a
        growing cpuset does not reach it. Best effort: threads come and go."""
        for tid in self.threads(cgroup):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpu_set)
        for child in self.children(cgroup):
            with contextlib.suppress(CgroupError):
                self.spread_threads(child, cpu_set)

    def move_process(self, cgroup: str, pid: int) -> None:
        self.write(cgroup, "cgroup.procs", str(pid))

    def move_thread(self, cgroup: str, tid: int) -> None:
        self.write(cgroup, "cgroup.threads", str(tid))

    def threads(self, cgroup: str) -> list[int]:
        return [int(t) for t in self.read(cgroup, "cgroup.threads").split()]

    def procs(self, cgroup: str) -> list[int]:
        return [int(p) for p in self.read(cgroup, "cgroup.procs").split()]

    def children(self, cgroup: str) -> list[str]:
        d = self.dir(cgroup)
        try:
            return sorted(f"{cgroup.rstrip('/')}/{p.name}" for p in d.iterdir() if p.is_dir())
        except OSError as e:
            raise CgroupError(f"cannot list {d}: {e.strerror}") from None

    async def remove(self, cgroup: str, attempts: int = 10, delay: float = 0.2) -> None:
        """rmdir, retrying while the kernel still counts exiting tasks (EBUSY)."""
        path = self.dir(cgroup)
        for attempt in range(attempts):
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == attempts - 1:
                    raise CgroupError(f"cannot remove {path}: {e.strerror}") from None
            await trio.sleep(delay)


def thread_cgroup(pid: int, tid: int) -> str:
    """The cgroup v2 path of one thread, from /proc."""
    text = procfs.read(f"/proc/{pid}/task/{tid}/cgroup")
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise CgroupError(f"thread {tid} of {pid} has no cgroup v2 path")


def pressures(cg: CgroupFS, cgroups: Mapping[str, str]) -> dict[str, Pressure]:
    """cpu.pressure of each named cgroup; one without PSI (psi=0) or going away is left out."""
    out = {}
    for label, cgroup in cgroups.items():
        try:
            out[label] = parse_pressure(cg.read(cgroup, "cpu.pressure"))
        except (CgroupError, ValueError):
            continue
    return out
