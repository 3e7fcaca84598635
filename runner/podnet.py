"""The pod's network namespace as a runner.netplan plan says: persistent taps (netlink through
pyroute2, which is imported only where a plan is made), forwarding sysctls and the nftables
tables (rules from runner.netrules). Thin effectful layer, blocking: callers run it in a thread.

The runner makes a plan in its own namespace (`nft` through its one reaper); the node controller
makes it in a pod's, from a thread of its own that enters that namespace and ends with the work
(namespaces are per thread, and a thread left in a pod's must never serve another request).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from runner import netplan, netrules, plumbing
from runner.log import log
from runner.node import procfs
from runner.procs import Reaper

SYSCTL = Path("/proc/sys")
TUNSETIFF, TUNSETPERSIST, TUNSETOWNER = 0x400454CA, 0x400454CB, 0x400454CC
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
IFA_F_NODAD = 0x02
CLONE_NEWNET = 0x40000000
NFT_TIMEOUT = 10.0
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


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
        if wanted:
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


# --- taps -----------------------------------------------------------------------------------------


def _tun(name: str) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise plumbing.PlumbingError(f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise plumbing.PlumbingError(f"cannot open tap {name}: {e.strerror}") from None
    return fd


def attach_tap(name: str) -> int:
    """An fd on a tap made for us: no NET_ADMIN needed, as its owner."""
    return _tun(name)


def _kind(ip: Any, name: str, owner: int | None = None) -> str | None:
    """The link's kind: "tun" for a tap nobody holds open (and, when `owner` is given, owned
    by `owner`: one a runner made), "tun+" for another tap, "" for another device, None when
    there is none."""
    links = ip.get_links(ifname=name) if ip.link_lookup(ifname=name) else []
    if not links:
        return None
    info = links[0].get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    if kind != "tun":
        return kind
    data = info.get_attr("IFLA_INFO_DATA")
    theirs = owner is not None and (data is None or data.get_attr("IFLA_TUN_OWNER") != owner)
    # A tap has carrier while a queue is attached: an fd open on it (QEMU's, a runner's).
    return "tun+" if theirs or links[0].get_attr("IFLA_CARRIER") else "tun"


def _taps(ip: Any) -> list[str]:
    names = []
    for link in ip.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        if info is not None and info.get_attr("IFLA_INFO_KIND") == "tun":
            names.append(link.get_attr("IFLA_IFNAME"))
    return names


def make_taps(plan: netplan.NetworkPlan, owner: int, made: list[str]) -> None:
    """Each tap made persistent and owned by `owner`, with its addresses, MTU and shaping.
    A tap of that name left by an instance killed before it could stop is replaced; any other
    device of that name is refused, and so is a tap someone holds open or another user owns.
    `made` gets each tap's name once it exists: what a failure leaves to remove."""
    from pyroute2 import IPRoute  # about a second to import: only where a plan is made

    with IPRoute() as ip:
        # Persistent taps are kernel memory of whoever makes them: a pod asking again and again
        # under new names must not pile them up in its namespace.
        planned = {t.name for t in plan.taps}
        others = [name for name in _taps(ip) if name not in planned]
        if len(others) + len(planned) > netplan.MAX_TAPS:
            raise plumbing.PlumbingError(
                f"{len(others)} other taps in the namespace: at most {netplan.MAX_TAPS} in all"
            )
        for tap in plan.taps:
            kind = _kind(ip, tap.name, owner)
            if kind == "tun+":
                raise plumbing.PlumbingError(f"tap {tap.name} exists and is in use or another's")
            if kind is not None and kind != "tun":
                raise plumbing.PlumbingError(f"network device {tap.name} exists and is no tap")
            if kind == "tun":
                ip.link("del", ifname=tap.name)
                log.warning("tap-replaced", tap=tap.name, detail="left by an earlier instance")
            fd = _tun(tap.name)
            try:
                fcntl.ioctl(fd, TUNSETOWNER, owner)
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
                made.append(tap.name)
            finally:
                os.close(fd)
            _set_up(ip, tap)


def _set_up(ip: Any, tap: netplan.TapPlan) -> None:
    from pyroute2 import NetlinkError

    index = ip.link_lookup(ifname=tap.name)[0]
    gw4 = ipaddress.IPv4Interface(tap.gateway4)
    try:
        ip.addr("add", index=index, address=str(gw4.ip), prefixlen=gw4.network.prefixlen)
        if tap.gateway6 is not None:  # no DAD: the tap is ours alone
            gw6 = ipaddress.IPv6Interface(tap.gateway6)
            ip.addr("add", index=index, address=str(gw6.ip), prefixlen=64, flags=IFA_F_NODAD)
        ip.link("set", index=index, mtu=tap.mtu, state="up")
        if tap.ingress_mbit is not None:
            # As libvirt's <bandwidth>: an htb class at the rate; its leaf is htb's default
            # fifo (sfq and fq_codel are modules a node may not have).
            rate = f"{tap.ingress_mbit}mbit"
            ip.tc("add", "htb", index, 0x10000, default=1)
            burst = tap.burst_kb * 1024
            ip.tc(
                "add-class",
                "htb",
                index,
                0x10001,
                parent=0x10000,
                rate=rate,
                ceil=rate,
                burst=burst,
            )
    except NetlinkError as e:
        raise plumbing.PlumbingError(f"cannot set up tap {tap.name}: {e}") from None


def remove_taps(plan: netplan.NetworkPlan) -> None:
    """The plan's taps, where they are taps (never another device of the name)."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        for tap in plan.taps:
            if _kind(ip, tap.name) in ("tun", "tun+"):
                ip.link("del", ifname=tap.name)


# --- nftables, and the whole plan in another namespace --------------------------------------------


def nft_now(binary: str, doc: netrules.Json) -> None:
    """Apply a JSON document from this thread (in its network namespace). For the node
    controller, which has no reaper: the child is its own and waited for here."""
    try:
        done = subprocess.run(
            # Not "-": nft opens /dev/stdin, which a minimal /dev may lack.
            [binary, "-j", "-f", "/proc/self/fd/0"],
            input=json.dumps(doc).encode(),
            capture_output=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise plumbing.PlumbingError(f"cannot run {binary}: {e}") from None
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise plumbing.PlumbingError(f"{binary} failed ({done.returncode}): {last[0][:200]}")


Apply = Callable[[netrules.Json], None]  # an nftables document, applied whole or not at all


def make(plan: netplan.NetworkPlan, owner: int, apply: Apply) -> dict[str, str]:
    """All of a plan in this thread's namespace; what the sysctls were, to put back later.
    Half-made, it is unmade before the error goes up."""
    sysctls = Sysctls()
    made: list[str] = []
    tables = False
    try:
        make_taps(plan, owner, made)
        sysctls.write(plan.sysctls())
        tables = True
        if plan.masquerade is not None:
            apply(netrules.ruleset(plan.masquerade))
        if plan.egress:
            apply(netrules.limits(plan.egress))
    except BaseException:
        # What this call made, and nothing else: a tap of the name may be another's.
        partial = netplan.NetworkPlan(
            taps=tuple(t for t in plan.taps if t.name in made),
            masquerade=plan.masquerade if tables else None,
            egress=plan.egress if tables else (),
        )
        unmake(partial, sysctls.before, apply)
        raise
    return sysctls.before


def unmake(plan: netplan.NetworkPlan, before: dict[str, str], apply: Apply) -> None:
    """The plan's tables and taps removed, the sysctls put back. Never raises for what is
    already gone."""
    docs = [netrules.removal()] if plan.masquerade is not None else []
    docs += [netrules.limits_removal()] if plan.egress else []
    for doc in docs:
        try:
            apply(doc)
        except (plumbing.PlumbingError, OSError) as e:
            log.warning("nft-table-left", table=netrules.TABLE, error=str(e))
    with contextlib.suppress(Exception):
        remove_taps(plan)
    Sysctls(dict(before)).restore()


def in_netns(nsfd: int, work: Callable[[], T]) -> T:
    """`work` in a new thread that enters the network namespace `nsfd` and then ends."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.setns(nsfd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            result.append(work())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
