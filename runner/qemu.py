"""QEMU's command line, built from the spec. Pure."""

from __future__ import annotations

from typing import Literal

from runner.spec import InstanceSpec


def qemu_argv(spec: InstanceSpec, accel: Literal["kvm", "tcg"], qmp_fd: int) -> list[str]:
    """QEMU starts paused (-S): vCPU threads exist but no guest code runs until `cont`, so
    they can be placed before the guest ever executes."""
    argv = [
        spec.qemu_binary,
        "-S",
        "-name",
        f"{spec.name},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]  # one host thread per vCPU
    argv += [
        "-smp",
        str(spec.vcpus),
        "-m",
        f"{spec.memory_mib}M",
        "-chardev",
        f"socket,id=qmp,fd={qmp_fd}",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if spec.kernel is not None:
        argv += ["-kernel", spec.kernel]
        if spec.initrd is not None:
            argv += ["-initrd", spec.initrd]
        if spec.cmdline is not None:
            argv += ["-append", spec.cmdline]
    argv += list(spec.extra_args)
    return argv
