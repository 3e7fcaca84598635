"""The pod's network namespace, for a masquerade nic: forwarding sysctls and the nftables table
(rules from runner.netrules). Thin effectful layer; `nft` runs through the one reaper."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import attrs
import trio

from runner import netrules, plumbing
from runner.log import log
from runner.node import procfs
from runner.procs import Reaper

SYSCTL = Path("/proc/sys")


def sysctls(tap: str, ipv6: bool) -> dict[str, str]:
    """What a masquerade nic needs, in the pod's namespace only: forwarding, and loopback
    sources routed to the tap (a connection to 127.0.0.1 that is DNATed to the guest)."""
    wanted = {"net/ipv4/ip_forward": "1", f"net/ipv4/conf/{tap}/route_localnet": "1"}
    if ipv6:
        wanted["net/ipv6/conf/all/forwarding"] = "1"
    return wanted


@attrs.define
class Sysctls:
    """Values written, and what they were, so that stopping puts them back."""

    before: dict[str, str] = attrs.Factory(dict)

    def write(self, wanted: dict[str, str]) -> None:
        for key, value in wanted.items():
            path = SYSCTL / key
            try:
                old = procfs.read(str(path)).strip()
                if old != value:
                    path.write_text(value + "\n")
                    self.before.setdefault(key, old)
            except OSError as e:
                raise plumbing.PlumbingError(
                    f"cannot set {key.replace('/', '.')}={value}: {e.strerror} (in a container "
                    "/proc/sys is read-only: the controller or a privileged pod must set it)"
                ) from None
        log.info("sysctls-set", **{k.replace("/", "."): v for k, v in wanted.items()})

    def restore(self) -> None:
        while self.before:
            key, old = self.before.popitem()
            with contextlib.suppress(OSError):  # the tap's own: gone with it
                (SYSCTL / key).write_text(old + "\n")


async def nft(
    reaper: Reaper, nursery: trio.Nursery, binary: str, doc: netrules.Json, at: Path
) -> None:
    """Apply a JSON document atomically (one `nft -j -f`: all of it or none)."""
    at.write_text(json.dumps(doc))
    try:
        await plumbing.run_command(reaper, nursery, [binary, "-j", "-f", str(at)])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(at)
