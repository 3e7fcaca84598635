"""Who is on the other end of a connection: resolved once, when it is accepted, so that a
pid reused later cannot pass for the caller.

With SO_PEERPIDFD (Linux 6.5+) the kernel hands us the peer itself: its cgroup is read, and
the pidfd then proves that the process still lives, so the cgroup read was its own. Older
kernels give only the pid: its start time is read before and after the cgroup, and a change
(or a vanished process) leaves the caller unidentified. Its PID namespace is read the same way:
it marks the pod once the runner has left its container cgroup.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

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
    uid: int | None = None
    cgroup: str = ""  # its cgroup v2 path as the node names it ("" when not proven)

    def on_node(self, own_ns: int, root: str) -> bool:
        """A root process of the node itself, outside every pod: in the controller's PID
        namespace, in no pod's container cgroup, and not in the cgroups the controller
        makes for pods. The one caller that may see every pod."""
        return (
            self.uid == 0
            and self.pod is None
            and self.pidns is not None
            and self.pidns == own_ns
            and bool(self.cgroup)
            and self.cgroup != root
            and not self.cgroup.startswith(root.rstrip("/") + "/")
        )

    @property
    def hidden(self) -> bool:
        """SO_PEERCRED gives pid 0 for a process outside our PID namespace (no hostPID)."""
        return self.how == OUTSIDE_PID_NAMESPACE


def peer_creds(sock: socket.socket) -> tuple[int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def cgroup_of(pid: int) -> str:
    try:
        return procfs.cgroup(pid)
    except OSError:
        return ""


def pod_of(cgroup: str) -> PodCgroup | None:
    try:
        return kube.parse_pod_cgroup(cgroup) if cgroup else None
    except ValueError:  # not a pod's
        return None


def pid_namespace(pid: int) -> int | None:
    try:
        return procfs.pid_namespace(pid)
    except OSError:
        return None


def lacks_peerpidfd(err: int | None) -> bool:
    """Only a kernel without SO_PEERPIDFD (before 6.5) is identified by pid and start time;
    any other failure is a peer that cannot be proven, and is refused."""
    return err == errno.ENOPROTOOPT


def identify(sock: socket.socket) -> Peer:
    try:
        pid, uid = peer_creds(sock)
    except OSError:
        return Peer(None, None, "no peer credentials")
    if pid <= 0:
        return Peer(None, None, OUTSIDE_PID_NAMESPACE)
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if not lacks_peerpidfd(e.errno):
            # EINVAL on 6.5 to 6.15: the peer was reaped already. Its pid may be anyone's now.
            return Peer(pid, None, f"peer gone ({errno.errorcode.get(e.errno or 0, e.errno)})")
        pidfd = -1
    if pidfd >= 0:
        try:
            cgroup, ns = cgroup_of(pid), pid_namespace(pid)
            if procfs.exited(pidfd):
                return Peer(pid, None, "peer gone (pidfd)")
            return Peer(pid, pod_of(cgroup), "pidfd", ns, uid, cgroup)
        finally:
            os.close(pidfd)
    before = procfs.start_time(pid)
    cgroup, ns = cgroup_of(pid), pid_namespace(pid)
    if before is None or procfs.start_time(pid) != before:
        return Peer(pid, None, "peer gone (start time)")
    return Peer(pid, pod_of(cgroup), "pid and start time", ns, uid, cgroup)
