"""Who is on the other end of a connection: resolved once, when it is accepted, so that a
pid reused later cannot pass for the caller.

With SO_PEERPIDFD (Linux 6.5+) the kernel hands us the peer itself: its cgroup is read, and
the pidfd then proves that the process still lives, so the cgroup read was its own. Older
kernels give only the pid: its start time is read before and after the cgroup, and a change
(or a vanished process) leaves the caller unidentified. Its PID namespace is read the same way:
it marks the pod once the runner has left its container cgroup.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import attrs

from runner import kube
from runner.kube import PodCgroup
from runner.node import procfs

SO_PEERPIDFD = 77
OUTSIDE_PID_NAMESPACE = "peer outside our pid namespace"


@attrs.frozen
class Peer:
    pid: int | None
    pod: PodCgroup | None  # None: not in a pod's container cgroup, or not provably so
    how: str
    pidns: int | None = None  # the inode of its PID namespace; None: not provably its own

    @property
    def hidden(self) -> bool:
        """SO_PEERCRED gives pid 0 for a process outside our PID namespace (no hostPID)."""
        return self.how == OUTSIDE_PID_NAMESPACE


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def pod_of(pid: int) -> PodCgroup | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
        return kube.parse_pod_cgroup(kube.own_cgroup_path(None, text))
    except (OSError, ValueError):  # gone, not a pod, or a name that is not UTF-8
        return None


def pid_namespace(pid: int) -> int | None:
    try:
        return procfs.pid_namespace(pid)
    except OSError:
        return None


def identify(sock: socket.socket) -> Peer:
    try:
        pid = peer_pid(sock)
    except OSError:
        return Peer(None, None, "no peer credentials")
    if pid <= 0:
        return Peer(None, None, OUTSIDE_PID_NAMESPACE)
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pidfd = -1
    if pidfd >= 0:
        try:
            pod, ns = pod_of(pid), pid_namespace(pid)
            if procfs.exited(pidfd):
                return Peer(pid, None, "pidfd")
            return Peer(pid, pod, "pidfd", ns)
        finally:
            os.close(pidfd)
    before = procfs.start_time(pid)
    pod, ns = pod_of(pid), pid_namespace(pid)
    if before is None or procfs.start_time(pid) != before:
        return Peer(pid, None, "pid and start time")
    return Peer(pid, pod, "pid and start time", ns)
