"""images/debkernel.py: which kernel modules an image loads, from fake lib/modules/KVER dirs.

Two layouts stand for the two Debian series the test VM boots: 6.1 ships virtio as modules
and fscache.ko of its own; 6.12 builds virtio in and merges fscache into netfs.ko.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


debkernel = load("debkernel", REPO / "images" / "debkernel.py")
testvm_build = load("testvm_build", REPO / "images" / "testvm" / "build.py")


def moddir(
    root: Path,
    kver: str,
    dep: dict[str, list[str]],
    builtin: Sequence[str] = (),
    modinfo: Sequence[str] = (),
    symbols: dict[str, str] | None = None,
    aliases: dict[str, str] | None = None,
    softdep: Sequence[str] = (),
) -> Path:
    """A lib/modules/KVER with the files depmod writes (module files are not needed)."""
    d = root / "lib" / "modules" / kver
    d.mkdir(parents=True)
    (d / "modules.dep").write_text(
        "".join(f"{path}:{''.join(' ' + x for x in deps)}\n" for path, deps in dep.items())
    )
    (d / "modules.builtin").write_text("".join(p + "\n" for p in builtin))
    (d / "modules.builtin.modinfo").write_bytes(b"".join(e.encode() + b"\0" for e in modinfo))
    (d / "modules.symbols").write_text(
        "# Aliases for symbols, used by symbol_request().\n"
        + "".join(f"alias symbol:{s} {m}\n" for s, m in (symbols or {}).items())
    )
    (d / "modules.alias").write_text(
        "# Aliases extracted from modules themselves.\n"
        + "".join(f"alias {a} {m}\n" for a, m in (aliases or {}).items())
    )
    (d / "modules.softdep").write_text("".join(line + "\n" for line in softdep))
    return d


V = "kernel/drivers/virtio/"


def netfilter(ext: str) -> dict[str, list[str]]:
    """The pod network's modules, as modules.dep lists their dependencies (last loaded
    first) on both series."""
    nf = "kernel/net/netfilter/"
    crc, d4, d6 = (
        f"kernel/lib/libcrc32c{ext}",
        f"kernel/net/ipv4/netfilter/nf_defrag_ipv4{ext}",
        f"kernel/net/ipv6/netfilter/nf_defrag_ipv6{ext}",
    )
    ct, nat, nfl, nft = (
        f"{nf}{m}{ext}" for m in ("nf_conntrack", "nf_nat", "nfnetlink", "nf_tables")
    )
    return {
        f"kernel/drivers/net/veth{ext}": [],
        f"kernel/crypto/crc32c_generic{ext}": [],
        crc: [],
        d4: [],
        d6: [],
        ct: [d6, d4, crc],
        nat: [ct, d6, d4, crc],
        nfl: [],
        nft: [nfl, crc],
        f"{nf}nft_chain_nat{ext}": [nft, nfl, nat, ct, d6, d4, crc],
        f"{nf}nft_nat{ext}": [nft, nat, ct, d6, d4, crc, nfl],
        f"{nf}nft_masq{ext}": [nft, nat, ct, d6, d4, crc, nfl],
        f"{nf}nft_ct{ext}": [nft, ct, d6, d4, crc, nfl],
        f"{nf}nft_limit{ext}": [nft, nfl, crc],
        f"kernel/net/sched/sch_htb{ext}": [],
    }


@pytest.fixture
def debian61(tmp_path: Path) -> Path:
    """6.1.0-*-amd64: virtio modules, fscache.ko separate from netfs.ko."""
    return moddir(
        tmp_path,
        "6.1.0-57-amd64",
        {
            f"{V}virtio_ring.ko": [],
            f"{V}virtio.ko": [f"{V}virtio_ring.ko"],
            f"{V}virtio_pci_legacy_dev.ko": [],
            f"{V}virtio_pci_modern_dev.ko": [],
            f"{V}virtio_pci.ko": [
                f"{V}virtio_pci_legacy_dev.ko",
                f"{V}virtio_pci_modern_dev.ko",
                f"{V}virtio.ko",
                f"{V}virtio_ring.ko",
            ],
            "kernel/drivers/char/virtio_console.ko": [f"{V}virtio.ko", f"{V}virtio_ring.ko"],
            "kernel/net/9p/9pnet.ko": [],
            "kernel/net/9p/9pnet_virtio.ko": [
                "kernel/net/9p/9pnet.ko",
                f"{V}virtio.ko",
                f"{V}virtio_ring.ko",
            ],
            "kernel/fs/netfs/netfs.ko": [],
            "kernel/fs/fscache/fscache.ko": ["kernel/fs/netfs/netfs.ko"],
            "kernel/fs/9p/9p.ko": [
                "kernel/net/9p/9pnet.ko",
                "kernel/fs/fscache/fscache.ko",
                "kernel/fs/netfs/netfs.ko",
            ],
            "kernel/fs/overlayfs/overlay.ko": [],
            "kernel/drivers/net/tun.ko": [],
            **netfilter(".ko"),
            # As `modinfo -F depends` gives them for 6.1.0-57 (file names with dashes).
            "kernel/virt/lib/irqbypass.ko": [],
            "kernel/drivers/vfio/vfio.ko": [],
            "kernel/drivers/vfio/vfio_virqfd.ko": [],
            "kernel/drivers/vfio/pci/vfio-pci-core.ko": [
                "kernel/drivers/vfio/vfio.ko",
                "kernel/drivers/vfio/vfio_virqfd.ko",
                "kernel/virt/lib/irqbypass.ko",
            ],
            "kernel/drivers/vfio/pci/vfio-pci.ko": [
                "kernel/drivers/vfio/pci/vfio-pci-core.ko",
                "kernel/drivers/vfio/vfio.ko",
                "kernel/drivers/vfio/vfio_virqfd.ko",
                "kernel/virt/lib/irqbypass.ko",
            ],
            "kernel/drivers/vfio/vfio_iommu_type1.ko": ["kernel/drivers/vfio/vfio.ko"],
        },
        builtin=["kernel/mm/zbud.ko"],
        modinfo=["zbud.alias=zpool-zbud", "zbud.license=GPL"],
        symbols={"fscache_acquire_cache": "fscache", "netfs_read_folio": "netfs"},
        aliases={"fs-9p": "9p", "fs-overlay": "overlay", "char-major-10-200": "tun"},
    )


@pytest.fixture
def debian612(tmp_path: Path) -> Path:
    """6.12.*+deb12-amd64: virtio built in, fscache merged into netfs.ko (which exports it)."""
    netfs = "kernel/fs/netfs/netfs.ko.xz"
    p9net = "kernel/net/9p/9pnet.ko.xz"
    return moddir(
        tmp_path,
        "6.12.118+deb12-amd64",
        {
            p9net: [netfs],
            "kernel/net/9p/9pnet_virtio.ko.xz": [p9net, netfs],
            netfs: [],
            "kernel/fs/9p/9p.ko.xz": [p9net, netfs],
            "kernel/fs/overlayfs/overlay.ko.xz": [],
            "kernel/drivers/net/tun.ko.xz": [],
            **netfilter(".ko.xz"),
            "kernel/virt/lib/irqbypass.ko.xz": [],
            "kernel/drivers/vfio/vfio.ko.xz": [],
            "kernel/drivers/vfio/pci/vfio-pci-core.ko.xz": [
                "kernel/drivers/vfio/vfio.ko.xz",
                "kernel/virt/lib/irqbypass.ko.xz",
            ],
            "kernel/drivers/vfio/pci/vfio-pci.ko.xz": [
                "kernel/drivers/vfio/pci/vfio-pci-core.ko.xz",
                "kernel/drivers/vfio/vfio.ko.xz",
                "kernel/virt/lib/irqbypass.ko.xz",
            ],
            "kernel/drivers/vfio/vfio_iommu_type1.ko.xz": ["kernel/drivers/vfio/vfio.ko.xz"],
        },
        builtin=[
            f"{V}virtio_ring.ko",
            f"{V}virtio.ko",
            f"{V}virtio_pci_legacy_dev.ko",
            f"{V}virtio_pci_modern_dev.ko",
            f"{V}virtio_pci.ko",
            "kernel/drivers/char/virtio_console.ko",
        ],
        modinfo=["virtio_pci.license=GPL", "virtio_console.license=GPL", "fuse.alias=fs-fuse"],
        symbols={
            "fscache_acquire_cache": "netfs",
            "fscache_n_read": "netfs",
            "p9_req_put": "9pnet",
        },
        aliases={"fs-9p": "9p", "fs-overlay": "overlay", "char-major-10-200": "tun"},
    )


def names(paths: list[str]) -> list[str]:
    return [debkernel.module_name(p) for p in paths]


def assert_load_order(d: Path, order: list[str]) -> None:
    """Each module once, and after everything modules.dep says it needs."""
    assert len(order) == len(set(order))
    index = debkernel.ModuleIndex(d)
    seen: set[str] = set()
    for mod in names(order):
        assert set(index.deps[mod]) <= seen, f"{mod} loads before {index.deps[mod]}"
        seen.add(mod)


def test_the_testvm_list_on_61_loads_virtio_and_a_separate_fscache(debian61: Path) -> None:
    order, provided = debkernel.resolve_modules(debian61, testvm_build.WANTED_MODULES)
    assert names(order) == [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "virtio_console",
        "9pnet",
        "9pnet_virtio",
        "netfs",
        "fscache",
        "9p",
        "overlay",
        "tun",
        "veth",
        "crc32c_generic",
        "libcrc32c",
        "nf_defrag_ipv4",
        "nf_defrag_ipv6",
        "nf_conntrack",
        "nf_nat",
        "nfnetlink",
        "nf_tables",
        "nft_chain_nat",
        "nft_nat",
        "nft_masq",
        "nft_ct",
        "nft_limit",
        "sch_htb",
        "irqbypass",
        "vfio_virqfd",
        "vfio",
        "vfio_pci_core",
        "vfio_pci",
        "vfio_iommu_type1",
    ]
    assert_load_order(debian61, order)
    assert {p.how for p in provided} == {"module"}


def test_the_testvm_list_on_612_skips_built_in_virtio_and_needs_no_fscache(
    debian612: Path,
) -> None:
    order, provided = debkernel.resolve_modules(debian612, testvm_build.WANTED_MODULES)
    assert order == [
        "kernel/fs/netfs/netfs.ko.xz",
        "kernel/net/9p/9pnet.ko.xz",
        "kernel/net/9p/9pnet_virtio.ko.xz",
        "kernel/fs/9p/9p.ko.xz",
        "kernel/fs/overlayfs/overlay.ko.xz",
        "kernel/drivers/net/tun.ko.xz",
        "kernel/drivers/net/veth.ko.xz",
        "kernel/crypto/crc32c_generic.ko.xz",
        "kernel/lib/libcrc32c.ko.xz",
        "kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko.xz",
        "kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz",
        "kernel/net/netfilter/nf_conntrack.ko.xz",
        "kernel/net/netfilter/nf_nat.ko.xz",
        "kernel/net/netfilter/nfnetlink.ko.xz",
        "kernel/net/netfilter/nf_tables.ko.xz",
        "kernel/net/netfilter/nft_chain_nat.ko.xz",
        "kernel/net/netfilter/nft_nat.ko.xz",
        "kernel/net/netfilter/nft_masq.ko.xz",
        "kernel/net/netfilter/nft_ct.ko.xz",
        "kernel/net/netfilter/nft_limit.ko.xz",
        "kernel/net/sched/sch_htb.ko.xz",
        "kernel/virt/lib/irqbypass.ko.xz",
        "kernel/drivers/vfio/vfio.ko.xz",
        "kernel/drivers/vfio/pci/vfio-pci-core.ko.xz",
        "kernel/drivers/vfio/pci/vfio-pci.ko.xz",
        "kernel/drivers/vfio/vfio_iommu_type1.ko.xz",
    ]
    assert_load_order(debian612, order)
    how = {p.wanted: p.describe() for p in provided}
    assert how["virtio_pci"] == "virtio_pci: built in"
    assert how["virtio_console"] == "virtio_console: built in"
    assert how["9p"] == "9p: module"


def test_a_module_merged_into_another_resolves_to_that_one(debian612: Path) -> None:
    # The old fixed list named fscache; on 6.12 it is code inside netfs.ko, not an error.
    order, provided = debkernel.resolve_modules(debian612, ["netfs", "fscache", "9p"])
    assert names(order) == ["netfs", "9pnet", "9p"]
    (fscache,) = [p for p in provided if p.wanted == "fscache"]
    assert (fscache.how, fscache.load) == ("merged", ("netfs",))
    assert fscache.describe() == "fscache: merged, in netfs"


def test_the_same_name_is_its_own_module_where_it_is_separate(debian61: Path) -> None:
    order, provided = debkernel.resolve_modules(debian61, ["fscache"])
    assert names(order) == ["netfs", "fscache"]
    assert provided[0].how == "module"


def test_built_in_names_and_aliases_load_nothing(debian612: Path, debian61: Path) -> None:
    assert debkernel.module_closure(debian612, ["virtio_ring", "virtio-pci", "fs-fuse"]) == []
    assert debkernel.module_closure(debian61, ["zbud", "zpool-zbud"]) == []


def test_aliases_of_shipped_modules_load_them(debian61: Path) -> None:
    order = debkernel.module_closure(debian61, ["fs-overlay", "char-major-10-200", "fs-9p"])
    assert names(order) == ["overlay", "tun", "netfs", "fscache", "9pnet", "9p"]
    assert_load_order(debian61, order)


def test_a_truly_absent_module_is_a_clear_error(debian612: Path, debian61: Path) -> None:
    with pytest.raises(debkernel.BuildError) as e:
        debkernel.resolve_modules(debian612, ["9p", "tunn", "nosuchmod"])
    msg = str(e.value)
    assert msg.startswith("kernel 6.12.118+deb12-amd64 has no module tunn")
    assert "close name: tun" in msg and "nosuchmod" in msg and "not shipped" in msg
    # No module exports vhost_* here: nothing stands in for it.
    with pytest.raises(debkernel.BuildError, match="no module vhost_net"):
        debkernel.module_closure(debian61, ["vhost_net"])


def test_merged_needs_evidence_from_the_exports(tmp_path: Path) -> None:
    # Without modules.symbols naming a provider, a missing name stays an error.
    d = moddir(tmp_path, "6.12.1", {"kernel/fs/netfs/netfs.ko.xz": []})
    with pytest.raises(debkernel.BuildError, match="no module fscache"):
        debkernel.module_closure(d, ["fscache"])


def test_soft_dependencies_load_first_and_cycles_are_errors(tmp_path: Path) -> None:
    d = moddir(
        tmp_path / "a",
        "k",
        {"a.ko": ["b.ko"], "b.ko": [], "crc.ko": []},
        softdep=["softdep a pre: crc absent post: b"],
    )
    assert debkernel.module_closure(d, ["a"]) == ["crc.ko", "b.ko", "a.ko"]
    d = moddir(tmp_path / "b", "k", {"a.ko": ["b.ko"], "b.ko": ["a.ko"]})
    with pytest.raises(debkernel.BuildError, match="cycle"):
        debkernel.module_closure(d, ["a"])


def test_a_missing_modules_dep_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(debkernel.BuildError, match="depmod"):
        debkernel.module_closure(tmp_path, ["tun"])


def test_kernel_packages_pick_the_newest_build_of_a_series(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pkgnames = """linux-image-6.1.0-9-amd64 linux-image-6.1.0-57-amd64
        linux-image-6.1.0-57-cloud-amd64 linux-image-6.12.99+deb12-amd64-unsigned
        linux-image-6.12.118+deb12-amd64-unsigned
        linux-image-6.12.118+deb12-cloud-amd64-unsigned linux-image-6.12.117+deb12-amd64
        linux-image-6.12-amd64 linux-image-6.12.120+deb12-amd64-dbg
        linux-image-6.12.118+deb12-rt-amd64-unsigned linux-image-6.12.117+deb12-rt-amd64"""
    depends = {
        "linux-image-amd64": "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n",
        "linux-image-6.12-amd64": "x\n  Depends: linux-image-6.12.117+deb12-amd64\n",
        "linux-image-6.12-rt-amd64": "x\n  Depends: linux-image-6.12.117+deb12-rt-amd64\n",
    }

    def fake_run(cmd: list[str], cwd: Path | None = None) -> str:
        return pkgnames if cmd[1] == "pkgnames" else depends[cmd[2]]

    monkeypatch.setattr(testvm_build, "run", fake_run)
    assert testvm_build.kernel_packages("6.1") == [
        "linux-image-6.1.0-56-amd64",
        "linux-image-6.1.0-57-amd64",
        "linux-image-6.1.0-9-amd64",
    ]
    assert testvm_build.kernel_packages("6.12") == [
        "linux-image-6.12.118+deb12-amd64-unsigned",
        "linux-image-6.12.99+deb12-amd64-unsigned",
        "linux-image-6.12.117+deb12-amd64",
    ]
    assert testvm_build.kernel_packages("6.12-rt") == [  # PREEMPT_RT, never the plain build
        "linux-image-6.12.118+deb12-rt-amd64-unsigned",
        "linux-image-6.12.117+deb12-rt-amd64",
    ]

    # Once linux-image-amd64 moves on to 6.12, the 6.1 series must not follow it.
    depends["linux-image-amd64"] = "x\n  Depends: linux-image-6.12.117+deb12-amd64\n"
    assert testvm_build.kernel_packages("6.1")[0] == "linux-image-6.1.0-57-amd64"
