#!/usr/bin/env python3
"""Build the test VM's kernel and initramfs from a stock Debian kernel package.

Artefacts land in ``<cache>/<series>-<key>/`` where the key hashes this builder, the init
script and the kernel series, so editing either rebuilds and an unchanged builder is reused.
Standard library only: it runs before the project's virtualenv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

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


class BuildError(Exception):
    pass


def cache_key(series: str) -> str:
    h = hashlib.sha256()
    for name in ("build.py", "init"):
        h.update((HERE / name).read_bytes())
    h.update(series.encode())
    return h.hexdigest()[:12]


def run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(f"{' '.join(cmd)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


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


def module_closure(moddir: Path) -> list[str]:
    """Relative module paths to load, dependencies first, each once."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    builtin = {
        Path(line).name.split(".")[0].replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().split()
    }
    by_name = {Path(p).name.split(".")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        if path not in order:
            order.append(path)

    for name in WANTED_MODULES:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise BuildError(f"module {name} is neither built in nor shipped")
    return order


def write_module(src: Path, dst: Path) -> None:
    # busybox insmod takes plain ELF only.
    if src.suffix == ".xz":
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    elif src.suffix == ".ko":
        shutil.copyfile(src, dst)
    else:
        raise BuildError(f"cannot unpack module {src.name}")


def build(series: str, out: Path) -> None:
    # Debian's busybox-static installs /bin/busybox; the dynamic one would not run in the initrd.
    busybox = "/bin/busybox"
    if not Path(busybox).exists() or b"/lib64/ld-linux" in Path(busybox).read_bytes()[:8192]:
        raise BuildError("busybox is missing: install the Debian package busybox-static")
    with tempfile.TemporaryDirectory(prefix="testvm-build-") as tmp_s:
        tmp = Path(tmp_s)
        pkg = kernel_package(series)
        run(["apt-get", "download", pkg], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {pkg} gave {len(debs)} files")
        root = tmp / "kernel"
        run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        (kver,) = [p.name for p in (root / "lib/modules").iterdir()]
        run(["depmod", "-b", str(root), kver])
        moddir = root / "lib/modules" / kver

        initrd = tmp / "initrd"
        for d in ("bin", "modules", "proc", "sys", "dev", "newroot", "lower", "rw"):
            (initrd / d).mkdir(parents=True)
        shutil.copy2(busybox, initrd / "bin/busybox")
        os.symlink("busybox", initrd / "bin/sh")
        shutil.copy2(HERE / "init", initrd / "init")
        (initrd / "init").chmod(0o755)
        names = []
        for rel in module_closure(moddir):
            name = Path(rel).name.split(".")[0] + ".ko"
            write_module(moddir / rel, initrd / "modules" / name)
            names.append(name)
        (initrd / "modules/order").write_text("\n".join(names) + "\n")

        files = sorted(str(p.relative_to(initrd)) for p in initrd.rglob("*"))
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=initrd,
            input="\n".join(files).encode(),
            capture_output=True,
        )
        if cpio.returncode != 0:
            raise BuildError(f"cpio failed: {cpio.stderr.decode().strip()}")

        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out.parent))
        try:
            (stage / "initrd.gz").write_bytes(gzip.compress(cpio.stdout, compresslevel=6))
            shutil.copyfile(root / "boot" / f"vmlinuz-{kver}", stage / "vmlinuz")
            (stage / "kernel-package").write_text(f"{pkg}\n{kver}\n")
            stage.chmod(0o755)
            stage.rename(out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def ensure(cache: Path, series: str) -> Path:
    """Return the artefact directory, building it (once, across processes) if needed."""
    if series not in SERIES:
        raise BuildError(f"unknown kernel series {series!r} (choose from {', '.join(SERIES)})")
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{series}-{cache_key(series)}"
    if (out / "vmlinuz").exists():
        return out
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "vmlinuz").exists():
            print(f"testvm: building the {series} test VM image (once)", file=sys.stderr)
            build(series, out)
    return out


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
