#!/usr/bin/env python3
"""Build the test VM's kernel and initramfs from a stock Debian kernel package.

Artefacts land in ``<cache>/<series>-<key>/`` where the key hashes this builder, the init
script, the shared kernel helper and the kernel series, so editing any of them rebuilds and an
unchanged builder is reused. Standard library only: it runs before the project's virtualenv
exists.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import debkernel  # noqa: E402
from debkernel import BuildError, assemble, cache_key, run  # noqa: E402

# The leaves the init script needs, nothing more. What they depend on (the virtio core, 9pnet,
# netfs, and fscache where it is still a module of its own) comes in from the kernel's
# modules.dep in load order, and what a kernel builds in is skipped, so one list fits 6.1
# (virtio as modules, fscache.ko) and 6.12 (virtio built in, fscache merged into netfs.ko).
WANTED_MODULES = [
    "virtio_pci",  # the PCI transport of every virtio device below
    "virtio_console",  # the testvm.* ports
    "9pnet_virtio",  # 9p over virtio ...
    "9p",  # ... for the host's root file system
    "overlay",  # the writable root over it
    "tun",  # /dev/net/tun for the jobs
    "veth",  # a pod's network namespace joined to the node's
    "crc32c_generic",  # nf_conntrack's libcrc32c asks the crypto API for crc32c at load
    "nft_chain_nat",  # a masquerade nic's rules: nat chains ...
    "nft_nat",  # ... dnat and snat ...
    "nft_masq",  # ... masquerade ...
    "nft_ct",  # ... connection state ...
    "nft_limit",  # ... and the policing of a guest's egress
    "sch_htb",  # the shaping towards a guest
    "vfio_pci",  # PCI passthrough tests (--pci-device-node) ...
    "vfio_iommu_type1",  # ... and the IOMMU backend vfio only soft-depends on
]

# Series -> (the metapackage that names its current build, the pattern of its builds).
SERIES = {
    "6.1": ("linux-image-amd64", r"linux-image-6\.1\.0-(\d+)-amd64"),
    "6.12": ("linux-image-6.12-amd64", r"linux-image-6\.12\.(\d+)\+deb\d+-amd64-unsigned"),
    # PREEMPT_RT: for realtime (SCHED_FIFO) vCPUs.
    "6.12-rt": (
        "linux-image-6.12-rt-amd64",
        r"linux-image-6\.12\.(\d+)\+deb\d+-rt-amd64-unsigned",
    ),
}


def kernel_packages(series: str) -> list[str]:
    """Stock kernel packages of a series that apt knows about, best first (at most three).

    6.1: the build the metapackage linux-image-amd64 names, then the newest ABIs. 6.12 (and
    its rt flavour): the newest build (the unsigned package comes out first), then the one the
    metapackage names. A later build of any series is picked up by name, whatever its
    modules' layout.
    """
    meta, pattern = SERIES[series]
    names = run(["apt-cache", "pkgnames", "linux-image-6."]).split()
    builds = sorted((int(m.group(1)), n) for n in names if (m := re.fullmatch(pattern, n)))
    newest = [n for _, n in reversed(builds)]
    try:
        deps = re.findall(r"Depends: (linux-image-\S+)", run(["apt-cache", "depends", meta]))
    except BuildError:
        deps = []
    release, rt = series.removesuffix("-rt"), series.endswith("-rt")
    named = [d for d in deps if d.startswith(f"linux-image-{release}.") and ("-rt-" in d) == rt]
    named = named[:1]
    found = list(dict.fromkeys(named + newest[:2] if series == "6.1" else newest[:2] + named))
    if not found:
        raise BuildError(
            f"no linux-image package of series {series} known to apt (run 'apt-get update')"
        )
    return found


def download(series: str, tmp: Path) -> tuple[str, Path]:
    """Download the best package of the series that the mirror still has."""
    errors = []
    for pkg in kernel_packages(series):
        try:
            run(["apt-get", "download", pkg], cwd=tmp)
        except BuildError as e:
            errors.append(str(e))
            continue
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {pkg} gave {len(debs)} files")
        return pkg, debs[0]
    raise BuildError(f"no {series} kernel package to download: " + "; ".join(errors))


def ensure(cache: Path, series: str) -> Path:
    """Return the artefact directory, building it (once, across processes) if needed."""
    if series not in SERIES:
        raise BuildError(f"unknown kernel series {series!r} (choose from {', '.join(SERIES)})")
    key = cache_key(HERE / "build.py", HERE / "init", extra=series)

    def build(out: Path, tmp: Path) -> None:
        pkg, deb = download(series, tmp)
        assemble(out, pkg, deb, HERE / "init", WANTED_MODULES, ("newroot", "lower", "rw"), tmp)

    return debkernel.ensure(cache / f"{series}-{key}", "testvm", build)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=HERE.parent.parent / ".cache" / "testvm")
    ap.add_argument("--kernel", default="6.1", help="kernel series: " + ", ".join(SERIES))
    args = ap.parse_args()
    try:
        print(ensure(args.cache, args.kernel))
    except BuildError as e:
        print(f"testvm-build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
