"""Who makes the guest's network plan (runner.netplan) in the pod's network namespace: the
runner itself in embedded mode, the node controller in controller mode (the pod then holds no
NET_ADMIN). Either way the taps are persistent and the runner's own, so that it opens them
without privilege, and the plan is unmade in reverse when the instance stops."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol

import trio

from runner import netplan, netrules, plumbing, podnet, rpc
from runner.log import log
from runner.procs import Reaper
from runner.run.options import StartupError


class NetworkMaker(Protocol):
    async def make(self, plan: netplan.NetworkPlan) -> dict[str, str]:
        """Made whole or not at all; what the sysctls were. StartupError if refused."""
        ...

    async def unmake(self, plan: netplan.NetworkPlan, before: dict[str, str]) -> None:
        """Never raises: what cannot be removed is logged."""
        ...


class Local:
    """Embedded: in our own namespace, with NET_ADMIN; `nft` through the one reaper."""

    def __init__(self, reaper: Reaper, nursery: trio.Nursery, nft: str, run_dir: Path) -> None:
        self.reaper, self.nursery, self.nft, self.at = reaper, nursery, nft, run_dir / "nft.json"

    def _apply(self, doc: netrules.Json) -> None:
        """From the worker thread: the reaper lives in the trio thread."""
        trio.from_thread.run(podnet.nft, self.reaper, self.nursery, self.nft, doc, self.at)

    async def make(self, plan: netplan.NetworkPlan) -> dict[str, str]:
        work = functools.partial(podnet.make, plan, os.geteuid(), self._apply)
        try:
            return await trio.to_thread.run_sync(work)
        except (plumbing.PlumbingError, OSError) as e:
            raise StartupError(str(e)) from None

    async def unmake(self, plan: netplan.NetworkPlan, before: dict[str, str]) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(podnet.unmake, plan, before, self._apply)


class ViaController:
    """Controller mode: the controller makes it in our namespace, checked as every other
    request of ours is."""

    def __init__(self, socket: str, timeout: float, uuid: str) -> None:
        self.socket, self.timeout, self.uuid = socket, min(timeout, 30.0), uuid

    async def make(self, plan: netplan.NetworkPlan) -> dict[str, str]:
        try:
            res = await rpc.call(
                self.socket,
                "makeNetwork",
                rpc.NetworkParams(self.uuid, plan),
                rpc.NetworkResult,
                timeout=self.timeout,
            )
        except (OSError, rpc.RPCError, trio.TooSlowError) as e:
            raise StartupError(
                f"the controller did not make the pod network: {str(e) or type(e).__name__}"
            ) from None
        assert isinstance(res, rpc.NetworkResult)
        return res.before

    async def unmake(self, plan: netplan.NetworkPlan, before: dict[str, str]) -> None:
        try:
            with trio.CancelScope(shield=True):
                await rpc.call(
                    self.socket,
                    "unmakeNetwork",
                    rpc.UnmakeNetworkParams(self.uuid, plan, before),
                    rpc.UnmakeNetworkResult,
                    timeout=self.timeout,
                )
        except (OSError, rpc.RPCError, trio.TooSlowError) as e:
            # The taps and tables are in the pod's namespace: they go with the pod.
            log.warning(
                "network-left",
                error=str(e) or type(e).__name__,
                detail="the pod's taps and tables go with its network namespace",
            )
