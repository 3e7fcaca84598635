#!/usr/bin/env python3
"""Build a small Linux guest (kernel and busybox initramfs) from a stock Debian kernel package.

The guest stands in for a customer VM: it takes an address by DHCP, pings its gateway, mounts a
virtiofs share, reports one ``GUEST-READY`` line on the serial console and powers off on the
ACPI power button (see ``init``). Artefacts (``vmlinuz``, ``initrd.gz``) land in
``<cache>/<key>/`` where the key hashes this builder and the init script, so editing either
rebuilds and an unchanged builder is reused. Standard library only, like ``images/testvm``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import debkernel  # noqa: E402
from debkernel import BuildError, assemble, cache_key, run  # noqa: E402

WANTED_MODULES = [
    "virtio_pci",
    "virtio_net",
    "af_packet",  # udhcpc's raw socket
    "virtiofs",
    "virtio_blk",  # disks, and the cloud-init seed ...
    "isofs",  # ... an ISO 9660 volume (guest.seed=1)
    "button",  # turns the ACPI power button into an input device ...
    "evdev",  # ... and this gives it the /dev/input/event* node init waits on
]


def kernel_packages() -> list[str]:
    """Kernel packages apt knows about, best first: the newest 6.12 cloud kernel, then 6.1.

    The cloud flavour boots fastest under TCG (no probing of hardware a VM never has) and has
    virtio-pci and virtiofs built in; the generic 6.1 kernel is the fallback on a mirror that
    does not carry the 6.12 backport.
    """
    names = run(["apt-cache", "pkgnames", "linux-image-6."]).split()
    cloud = re.compile(r"^linux-image-6\.12\.(\d+)\+deb\d+-cloud-amd64-unsigned$")
    found = sorted((int(m.group(1)), n) for n in names if (m := cloud.match(n)))
    best = [n for _, n in reversed(found)]
    # The metapackage names the current 6.1 ABI; older ABIs may be gone from the mirror.
    meta = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True)
    m = re.search(r"Depends: (linux-image-6\.1\.0-\d+-amd64)\b", meta.stdout.decode())
    if m:
        best.append(m.group(1))
    else:
        generic = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")
        found = sorted((int(m.group(1)), n) for n in names if (m := generic.match(n)))
        best += [n for _, n in reversed(found)][:1]
    return best


def download_kernel(tmp: Path) -> tuple[str, Path]:
    """Download the best kernel package that apt can fetch, refreshing its lists only if needed.

    apt-get update is slow and changes the machine, so it runs only when no candidate is known
    or every known one fails to download (stale lists name files the mirror has dropped).
    """
    errors: list[str] = []
    for refresh in (False, True):
        if refresh:
            print("guest: no kernel package to fetch, running apt-get update", file=sys.stderr)
            run(["apt-get", "update"])
        for pkg in kernel_packages():
            try:
                run(["apt-get", "download", pkg], cwd=tmp)
            except BuildError as e:
                errors.append(str(e))
                continue
            debs = list(tmp.glob("*.deb"))
            if len(debs) != 1:
                raise BuildError(f"apt-get download {pkg} gave {len(debs)} files")
            return pkg, debs[0]
    raise BuildError("no 6.12 cloud or 6.1 kernel package to download: " + "; ".join(errors))


def ensure(cache: Path) -> Path:
    """Return the artefact directory, building it (once, across processes) if needed."""
    key = cache_key(HERE / "build.py", HERE / "init")

    def build(out: Path, tmp: Path) -> None:
        pkg, deb = download_kernel(tmp)
        assemble(out, pkg, deb, HERE / "init", WANTED_MODULES, ("etc", "run", "tmp", "share"), tmp)

    return debkernel.ensure(cache / key, "guest", build)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=HERE.parent.parent / ".cache" / "guest")
    args = ap.parse_args()
    try:
        print(ensure(args.cache))
    except BuildError as e:
        print(f"guest-build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
