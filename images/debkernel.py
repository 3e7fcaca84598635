"""Shared by the image builders: a stock Debian kernel package plus a busybox initramfs.

Standard library only (the builders run before the project's virtualenv exists). The cache
key of an image covers this file too, so a change here rebuilds every image.
"""

from __future__ import annotations

import difflib
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
from dataclasses import dataclass
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


def module_name(path: str) -> str:
    """A module's name from its file: kernel/net/9p/9pnet_virtio.ko.xz -> 9pnet_virtio."""
    return Path(path).name.split(".", 1)[0].replace("-", "_")


@dataclass(frozen=True)
class Provided:
    """How a kernel provides one wanted name: `load` are the shipped modules to load for it
    (none when the image has it built in), `by` the modules that hold it."""

    wanted: str
    how: str  # "module", "built in", "alias" or "merged"
    by: tuple[str, ...] = ()
    load: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.how in ("module", "built in") and self.by == (self.wanted.replace("-", "_"),):
            return f"{self.wanted}: {self.how}"
        return f"{self.wanted}: {self.how}, in {', '.join(self.by)}"


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


class ModuleIndex:
    """What one unpacked kernel says about its modules, read from the files depmod writes and
    the package ships in lib/modules/KVER: modules.dep (shipped modules and their
    dependencies), modules.builtin and modules.builtin.modinfo (what the image has built in,
    with the aliases of built-in code), modules.alias, modules.symbols (who exports what) and
    modules.softdep. Nothing here assumes one kernel's layout."""

    def __init__(self, moddir: Path) -> None:
        self.kver = moddir.name
        dep = moddir / "modules.dep"
        if not dep.exists():
            raise BuildError(f"{dep} is missing: depmod did not run")
        self.path: dict[str, str] = {}  # shipped module -> its file, relative to moddir
        self.deps: dict[str, list[str]] = {}  # shipped module -> modules it needs
        for line in dep.read_text().splitlines():
            path, sep, rest = line.partition(":")
            if sep:
                name = module_name(path)
                self.path[name] = path.strip()
                self.deps[name] = [module_name(p) for p in rest.split()]

        self.builtin = {module_name(p) for p in _text(moddir / "modules.builtin").split()}
        self.builtin_alias: dict[str, set[str]] = {}
        info = moddir / "modules.builtin.modinfo"
        for entry in (info.read_bytes() if info.exists() else b"").split(b"\0"):
            key, eq, value = entry.decode(errors="replace").partition("=")
            mod, dot, field = key.partition(".")
            if eq and dot and mod:
                self.builtin.add(mod.replace("-", "_"))
                if field == "alias":
                    self.builtin_alias.setdefault(value, set()).add(mod.replace("-", "_"))

        self.alias: dict[str, set[str]] = {}  # alias -> shipped modules
        self.exports: dict[str, set[str]] = {}  # exported symbol -> shipped modules
        for f in ("modules.alias", "modules.symbols"):
            for line in _text(moddir / f).splitlines():
                parts = line.split()
                if len(parts) != 3 or parts[0] != "alias":
                    continue
                _, pattern, mod = parts
                if pattern.startswith("symbol:"):
                    self.exports.setdefault(pattern[7:], set()).add(mod.replace("-", "_"))
                else:
                    self.alias.setdefault(pattern, set()).add(mod.replace("-", "_"))

        self.pre: dict[str, list[str]] = {}  # softdep MOD pre: ...
        for line in _text(moddir / "modules.softdep").splitlines():
            words = line.split()
            if len(words) < 2 or words[0] != "softdep":
                continue
            section = ""
            for w in words[2:]:
                if w.endswith(":"):
                    section = w
                elif section == "pre:":
                    self.pre.setdefault(words[1].replace("-", "_"), []).append(w.replace("-", "_"))

    def provider(self, wanted: str) -> Provided | None:
        """How `wanted` (a module name or alias) is provided, or None if it is not at all.

        In order: a shipped module of that name; a module built into the image; an alias of
        built-in code or of a shipped module (e.g. fs-9p); code merged into one shipped module
        that exports the name's symbols (6.12 builds fscache into netfs.ko, whose exports
        fscache_* say so, while 6.1 ships fscache.ko)."""
        name = wanted.replace("-", "_")
        if name in self.path:
            return Provided(wanted, "module", (name,), (name,))
        if name in self.builtin:
            return Provided(wanted, "built in", (name,))
        if wanted in self.builtin_alias:
            return Provided(wanted, "built in", tuple(sorted(self.builtin_alias[wanted])))
        shipped = tuple(sorted(m for m in self.alias.get(wanted, ()) if m in self.path))
        if shipped:
            return Provided(wanted, "alias", shipped, shipped)
        prefix = name + "_"
        owners = {m for sym, mods in self.exports.items() if sym.startswith(prefix) for m in mods}
        owners &= self.path.keys()
        if len(owners) == 1:
            return Provided(wanted, "merged", tuple(owners), tuple(owners))
        return None

    def resolve(self, wanted: list[str]) -> list[Provided]:
        found, missing = [], []
        for name in wanted:
            p = self.provider(name)
            if p is None:
                missing.append(name)
            else:
                found.append(p)
        if missing:
            hints = []
            for name in missing:
                close = difflib.get_close_matches(
                    name.replace("-", "_"), self.path, n=3, cutoff=0.75
                )
                if close:
                    hints.append(f"{name} (shipped modules with a close name: {', '.join(close)})")
                else:
                    hints.append(name)
            raise BuildError(
                f"kernel {self.kver} has no module {'; '.join(hints)}: not shipped (modules.dep),"
                " not built in (modules.builtin), no alias (modules.alias) and not merged into"
                " a shipped module (modules.symbols)"
            )
        return found

    def closure(self, modules: list[str]) -> list[str]:
        """Files of `modules` and of everything they need, dependencies first, each once.

        Dependencies come from modules.dep; `pre:` soft dependencies that the package ships
        are loaded before their module too, as modprobe does."""
        order: list[str] = []
        done: set[str] = set()
        active: list[str] = []

        def visit(mod: str, soft: bool = False) -> None:
            if mod in done:
                return
            if mod in active:
                if soft:
                    return
                raise BuildError(f"modules.dep has a cycle: {' -> '.join([*active, mod])}")
            if mod not in self.path:
                needed_by = f" (needed by {active[-1]})" if active else ""
                raise BuildError(f"modules.dep names {mod}{needed_by} but not its file")
            active.append(mod)
            for pre in self.pre.get(mod, ()):
                if pre in self.path:
                    visit(pre, soft=True)
            # depmod lists a module's dependencies so that the last one loads first.
            for dep in reversed(self.deps[mod]):
                visit(dep)
            active.pop()
            done.add(mod)
            order.append(self.path[mod])

        for mod in modules:
            visit(mod)
        return order


def resolve_modules(moddir: Path, wanted: list[str]) -> tuple[list[str], list[Provided]]:
    """Module files to load for `wanted`, in load order, and how each wanted name is provided.

    Name only what is needed (the leaves): what they depend on comes in from modules.dep,
    whatever this kernel builds in is skipped, and a name merged into another module
    resolves to that one, so one list fits kernels of different layouts. A name the kernel
    does not provide at all is a BuildError naming it."""
    index = ModuleIndex(moddir)
    provided = index.resolve(wanted)
    return index.closure([m for p in provided for m in p.load]), provided


def module_closure(moddir: Path, wanted: list[str]) -> list[str]:
    """Relative module paths to load, dependencies first, each once; built-in ones skipped."""
    return resolve_modules(moddir, wanted)[0]


def write_module(src: Path, dst: Path) -> None:
    # busybox insmod takes plain ELF only.
    if src.suffix == ".xz":
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    elif src.suffix == ".gz":
        dst.write_bytes(gzip.decompress(src.read_bytes()))
    elif src.suffix == ".zst" and shutil.which("zstd"):
        run(["zstd", "-q", "-d", "-f", "-o", str(dst), str(src)])
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
    order, provided = resolve_modules(moddir, wanted)
    names = []
    for rel in order:
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
        (stage / "wanted-modules").write_text("".join(p.describe() + "\n" for p in provided))
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
