"""The runner's options (from the command line or the environment) and its one error."""

from __future__ import annotations

from typing import Literal

import attrs

RUN_DIR_BASE = "/run/instance-runner"


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


@attrs.frozen(kw_only=True)
class Options:
    spec_path: str
    cgroup_mount: str = "/sys/fs/cgroup"
    cgroup_root: str = "/sys/fs/cgroup/instances"
    kubelet_dir: str = "/var/lib/kubelet"
    # None: a directory of its own below RUN_DIR_BASE, named for the pod (or the instance),
    # so that pods sharing /run/instance-runner with the node never share files.
    run_dir: str | None = None
    # Where an image disk's overlay lives while QEMU runs (its TMPDIR): an emptyDir, on disk.
    scratch_dir: str = "/var/tmp"
    shutdown_timeout: float = 20.0
    qmp_timeout: float = 30.0
    allow_spare_cpus: bool = False
    isolation: Literal["on", "off"] = "on"  # off: no cgroups, no pinning (laptops, e2e tests)
    dnsmasq: str = "dnsmasq"
    nft: str = "nft"
    passt: str = "passt"
    ovmf_code: str = "/usr/share/OVMF/OVMF_CODE_4M.fd"  # Debian's ovmf
    ovmf_vars: str = "/usr/share/OVMF/OVMF_VARS_4M.fd"  # the variable store's template
    virtiofsd: str | None = None  # None: the Rust daemon if installed, else QEMU's C one
    controller_socket: str | None = None  # None: embedded mode, the runner makes its cgroups
    pod_uid: str | None = None  # told (Downward API): needed in a private cgroup namespace
    controller_timeout: float = 30.0
    # isolated: the instance CPUs become an isolated cpuset partition (embedded mode; in
    # controller mode the controller decides)
    partition: Literal["none", "isolated"] = "none"
    verify_interval: float = 1.0  # how often pinning is re-checked while the guest runs; 0: never
    pause_before: str | None = None  # fault-injection hook for tests: wait before this step
    resume_early: bool = False  # benchmark baseline: the guest runs before it is pinned
    metrics_address: str | None = None  # HOST:PORT for /metrics, /healthz, /readyz; None: off
    inherited_fds: frozenset[int] = frozenset()  # open when the runner started (spec fds)
