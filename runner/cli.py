"""Command line of instance-runner; every option can also come from the environment."""

from __future__ import annotations

import click

from runner import __version__


@click.group(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "auto_envvar_prefix": "INSTANCE_RUNNER",
    }
)
@click.version_option(__version__, prog_name="instance-runner")
def main() -> None:
    """Give each vCPU of a VM in a Kubernetes pod its own dedicated CPU.

    Runs as the pod's ENTRYPOINT (PID 1): vCPU threads go to a per-pod instance cgroup, one
    dedicated CPU each; everything else in the pod runs on the node's shared CPUs.
    """
