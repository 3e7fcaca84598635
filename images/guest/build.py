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

# What the init script needs; dependencies are added from modules.dep and built-in ones
# (modules.builtin) are skipped, so one list serves the cloud kernel (virtio-pci, virtiofs and
# af_packet built in) and the generic one (almost everything modular).
WANTED_MODULES = [
    "virtio_pci",
    "virtio_net",
    "af_packet",  # udhcpc's raw socket
    "virtiofs",
    "button",  # turns the ACPI power button into an input device ...
    "evdev",  # ... and this gives it the /dev/input/event* node init waits on
]


class BuildError(Exception):
    pass


def cache_key() -> str:
    h = hashlib.sha256()
    for name in ("build.py", "init"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:12]


def run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(f"{' '.join(cmd)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


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


def build(out: Path) -> None:
    # Debian's busybox-static installs /bin/busybox; the dynamic one would not run in the initrd.
    busybox = "/bin/busybox"
    if not Path(busybox).exists() or b"/lib64/ld-linux" in Path(busybox).read_bytes()[:8192]:
        raise BuildError("busybox is missing: install the Debian package busybox-static")
    with tempfile.TemporaryDirectory(prefix="guest-build-") as tmp_s:
        tmp = Path(tmp_s)
        pkg, deb = download_kernel(tmp)
        root = tmp / "kernel"
        run(["dpkg-deb", "-x", str(deb), str(root)])
        (kver,) = [p.name for p in (root / "lib/modules").iterdir()]
        # The package ships no modules.dep: its postinst runs depmod.
        run(["depmod", "-b", str(root), kver])
        moddir = root / "lib/modules" / kver

        initrd = tmp / "initrd"
        for d in ("bin", "modules", "proc", "sys", "dev", "etc", "run", "tmp", "share"):
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
        (initrd / "modules/order").write_text("".join(n + "\n" for n in names))

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
            (stage / "modules").write_text("".join(n + "\n" for n in names))
            stage.chmod(0o755)
            stage.rename(out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def ensure(cache: Path) -> Path:
    """Return the artefact directory, building it (once, across processes) if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / cache_key()
    if (out / "vmlinuz").exists():
        return out
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "vmlinuz").exists():
            print("guest: building the guest image (once)", file=sys.stderr)
            build(out)
    return out


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
