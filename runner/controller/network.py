"""A pod's network, made by the controller in that pod's network namespace: its taps (owned by
the caller's user, so that the pod opens them without NET_ADMIN), the sysctls and the nftables
tables its runner.netplan plan needs. As KubeVirt's virt-handler does for virt-launcher.

The namespace is the caller's own, taken from the process that asked (under a pidfd bracket),
never named by the request: a pod can act on its own namespace only, and never on the node's.
The work runs in a thread that enters the namespace and then ends, a few pods at a time.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import trio

from runner import netrules, plumbing, podnet, rpc
from runner.controller.identity import Peer
from runner.node import bracket, procfs

NODE_NETNS = "/proc/1/ns/net"  # the node's, with hostPID
AT_ONCE = 2  # pods whose network is being made at the same time


class Maker:
    def __init__(self, nft: str) -> None:
        self.nft = nft
        self.limiter = trio.CapacityLimiter(AT_ONCE)
        self.busy: set[str] = set()  # pods with a request under way: one at a time each

    def _netns(self, peer: Peer, pidns: int) -> int:
        """An fd of the caller's network namespace; refused for the node's or ours."""
        if peer.pid is None or peer.hidden:
            raise rpc.RPCError(rpc.FORBIDDEN, "the caller's process is not visible to the node")
        pid = peer.pid
        fd = -1
        try:
            with bracket.process(pid, check=lambda: procfs.pid_namespace(pid) == pidns):
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            raise rpc.RPCError(rpc.FORBIDDEN, f"the caller cannot be proven: {e}") from None
        ino = os.fstat(fd).st_ino
        shared = set()
        for path in (NODE_NETNS, "/proc/self/ns/net"):
            with contextlib.suppress(OSError):
                shared.add(os.stat(path).st_ino)
        if ino in shared:
            os.close(fd)
            raise rpc.RPCError(
                rpc.FORBIDDEN, "the caller shares the node's network namespace (hostNetwork)"
            )
        return fd

    async def _in_pod(
        self, uuid: str, peer: Peer, pidns: int, work: Callable[[], object]
    ) -> object:
        if uuid in self.busy:
            raise rpc.RPCError(rpc.CONFLICT, f"pod {uuid}'s network is being changed already")
        self.busy.add(uuid)
        try:
            fd = self._netns(peer, pidns)
            try:
                return await trio.to_thread.run_sync(
                    podnet.in_netns, fd, work, limiter=self.limiter
                )
            finally:
                os.close(fd)
        finally:
            self.busy.discard(uuid)

    def _apply(self, doc: netrules.Json) -> None:
        podnet.nft_now(self.nft, doc)

    async def make(self, peer: Peer, pidns: int, p: rpc.NetworkParams) -> rpc.NetworkResult:
        if peer.uid is None:  # the taps' owner: never guessed
            raise rpc.RPCError(rpc.FORBIDDEN, "the caller's user is not known")
        work = functools.partial(podnet.make, p.plan, peer.uid, self._apply)
        try:
            before = await self._in_pod(p.uuid, peer, pidns, work)
        except plumbing.PlumbingError as e:
            raise rpc.RPCError(rpc.INVALID_PARAMS, str(e)) from None
        assert isinstance(before, dict)
        return rpc.NetworkResult(before)

    async def unmake(
        self, peer: Peer, pidns: int, p: rpc.UnmakeNetworkParams
    ) -> rpc.UnmakeNetworkResult:
        try:
            p.plan.check_restore(p.before)
        except ValueError as e:
            raise rpc.RPCError(rpc.INVALID_PARAMS, str(e)) from None
        work = functools.partial(podnet.unmake, p.plan, p.before, self._apply)
        await self._in_pod(p.uuid, peer, pidns, work)
        return rpc.UnmakeNetworkResult(True)
