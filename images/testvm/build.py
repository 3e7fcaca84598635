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

# What the init script needs, in the order it loads them; dependencies are added from
# modules.dep, built-in ones (modules.builtin) are skipped, so the list works across series.
WANTED_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
    "overlay",
    "tun",
]

SERIES = ("6.1", "6.12")


def kernel_package(series: str) -> str:
    """The newest stock kernel package of a series that apt knows about."""
    if series == "6.1":
        # The metapackage names the current 6.1 ABI.
        out = run(["apt-cache", "depends", "linux-image-amd64"])
        m = re.search(r"Depends: (linux-image-6\.1\.0-\d+-amd64)\b", out)
        if m:
            return m.group(1)
        pattern = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")
    else:
        pattern = re.compile(r"^linux-image-6\.12\.(\d+)\+deb\d+-amd64-unsigned$")
    names = run(["apt-cache", "pkgnames", "linux-image-6."]).split()
    found = sorted((int(m.group(1)), n) for n in names if (m := pattern.match(n)))
    if not found:
        raise BuildError(
            f"no linux-image package of series {series} known to apt (run 'apt-get update')"
        )
    return found[-1][1]


def ensure(cache: Path, series: str) -> Path:
    """Return the artefact directory, building it (once, across processes) if needed."""
    if series not in SERIES:
        raise BuildError(f"unknown kernel series {series!r} (choose from {', '.join(SERIES)})")
    key = cache_key(HERE / "build.py", HERE / "init", extra=series)

    def build(out: Path, tmp: Path) -> None:
        pkg = kernel_package(series)
        run(["apt-get", "download", pkg], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {pkg} gave {len(debs)} files")
        assemble(out, pkg, debs[0], HERE / "init", WANTED_MODULES, ("newroot", "lower", "rw"), tmp)

    return debkernel.ensure(cache / f"{series}-{key}", "testvm", build)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=HERE.parent.parent / ".cache" / "testvm")
    ap.add_argument("--kernel", default="6.1", help="kernel series: 6.1 or 6.12")
    args = ap.parse_args()
    try:
        print(ensure(args.cache, args.kernel))
    except BuildError as e:
        print(f"testvm-build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
