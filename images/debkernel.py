"""Shared by the image builders: a stock Debian kernel package plus a busybox initramfs.

Standard library only (the builders run before the project's virtualenv exists). The cache
key of an image covers this file too, so a change here rebuilds every image.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


class BuildError(Exception):
    pass


def run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(f"{' '.join(cmd)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def cache_key(*files: Path, extra: str = "") -> str:
    h = hashlib.sha256((HERE / "debkernel.py").read_bytes())
    for f in files:
        h.update(f.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()[:12]


def module_closure(moddir: Path, wanted: list[str]) -> list[str]:
    """Relative module paths to load, dependencies first, each once; built-in ones skipped."""
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

    for name in wanted:
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


def static_busybox() -> str:
    # Debian's busybox-static installs /bin/busybox; the dynamic one would not run in the initrd.
    busybox = "/bin/busybox"
    if not Path(busybox).exists() or b"/lib64/ld-linux" in Path(busybox).read_bytes()[:8192]:
        raise BuildError("busybox is missing: install the Debian package busybox-static")
    return busybox


def assemble(
    out: Path, pkg: str, deb: Path, init: Path, wanted: list[str], dirs: tuple[str, ...], tmp: Path
) -> None:
    """Kernel and initramfs (busybox, init, the wanted modules and their dependencies, in
    load order) from one kernel .deb, moved into `out` in one rename."""
    busybox = static_busybox()
    root = tmp / "kernel"
    run(["dpkg-deb", "-x", str(deb), str(root)])
    (kver,) = [p.name for p in (root / "lib/modules").iterdir()]
    # The package ships no modules.dep: its postinst runs depmod.
    run(["depmod", "-b", str(root), kver])
    moddir = root / "lib/modules" / kver

    initrd = tmp / "initrd"
    for d in ("bin", "modules", "proc", "sys", "dev", *dirs):
        (initrd / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, initrd / "bin/busybox")
    os.symlink("busybox", initrd / "bin/sh")
    shutil.copy2(init, initrd / "init")
    (initrd / "init").chmod(0o755)
    names = []
    for rel in module_closure(moddir, wanted):
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


def ensure(out: Path, what: str, build: Callable[[Path, Path], None]) -> Path:
    """Return `out`, building it (once, across processes) with build(out, tmp) if needed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "vmlinuz").exists():
        return out
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "vmlinuz").exists():
            print(f"{what}: building the image (once)", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix=f"{what}-build-") as tmp:
                build(out, Path(tmp))
    return out
