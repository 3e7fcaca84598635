"""Command line of instance-runner; every option can also come from the environment."""

from __future__ import annotations

import sys

import click
import trio

from runner import __version__
from runner.log import log
from runner.supervisor import STEPS, Options, Supervisor

ENV = "INSTANCE_RUNNER_"


def env(name: str) -> str:
    return ENV + name


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="instance-runner")
def cli() -> None:
    """Give each vCPU of a VM in a Kubernetes pod its own dedicated CPU.

    Runs as the pod's ENTRYPOINT (PID 1): vCPU threads go to a per-pod instance cgroup, one
    dedicated CPU each; everything else in the pod runs on the node's shared CPUs.
    """


@cli.command()
@click.option(
    "--spec",
    "spec_path",
    required=True,
    envvar=env("SPEC"),
    show_envvar=True,
    metavar="FILE",
    help="Instance spec (JSON).",
)
@click.option(
    "--cgroup-root",
    default="/sys/fs/cgroup/instances",
    envvar=env("CGROUP_ROOT"),
    show_envvar=True,
    help="Directory holding float/ and instance-<pod uid>/.",
)
@click.option(
    "--cgroup-mount",
    default="/sys/fs/cgroup",
    envvar=env("CGROUP_MOUNT"),
    show_envvar=True,
    help="Where the cgroup v2 hierarchy is mounted.",
)
@click.option(
    "--kubelet-dir",
    default="/var/lib/kubelet",
    envvar=env("KUBELET_DIR"),
    show_envvar=True,
    help="kubelet's state directory; float follows its cpu_manager_state.",
)
@click.option(
    "--run-dir",
    default="/run/instance-runner",
    envvar=env("RUN_DIR"),
    show_envvar=True,
    help="Where the readiness file 'ready' is written.",
)
@click.option(
    "--shutdown-timeout",
    default=30.0,
    type=click.FloatRange(min=0),
    envvar=env("SHUTDOWN_TIMEOUT"),
    show_envvar=True,
    metavar="SECONDS",
    help="How long the guest gets to power off before QEMU is told to quit.",
)
@click.option(
    "--qmp-timeout",
    default=30.0,
    type=click.FloatRange(min=0.1),
    envvar=env("QMP_TIMEOUT"),
    show_envvar=True,
    metavar="SECONDS",
    help="Deadline for QEMU to answer on QMP at start-up.",
)
@click.option(
    "--allow-spare-cpus",
    is_flag=True,
    envvar=env("ALLOW_SPARE_CPUS"),
    show_envvar=True,
    help="Accept fewer vCPUs than dedicated CPUs.",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default="json",
    envvar=env("LOG_FORMAT"),
    show_envvar=True,
    help="Logs on stderr.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    envvar=env("LOG_LEVEL"),
    show_envvar=True,
)
@click.option(
    "--controller-socket",
    envvar=env("CONTROLLER_SOCKET"),
    show_envvar=True,
    metavar="PATH",
    help="Get the cgroups from the node controller at this socket "
    "(default: the runner makes them itself).",
)
@click.option(
    "--controller-timeout",
    default=30.0,
    type=click.FloatRange(min=0.1),
    envvar=env("CONTROLLER_TIMEOUT"),
    show_envvar=True,
    metavar="SECONDS",
    help="How long to keep retrying the controller before giving up.",
)
@click.option(
    "--pause-before",
    type=click.Choice(STEPS),
    envvar=env("PAUSE_BEFORE"),
    hidden=True,
    help="Testing: wait before this start-up step.",
)
def run(
    spec_path: str,
    cgroup_root: str,
    cgroup_mount: str,
    kubelet_dir: str,
    run_dir: str,
    shutdown_timeout: float,
    qmp_timeout: float,
    allow_spare_cpus: bool,
    log_format: str,
    log_level: str,
    controller_socket: str | None,
    controller_timeout: float,
    pause_before: str | None,
) -> None:
    """Start the instance and keep its vCPUs pinned until SIGTERM or the guest's end.

    QEMU starts paused; each vCPU thread moves to the instance cgroup and is pinned to one of
    the pod's dedicated CPUs before the guest runs. Everything else moves to the shared float
    cgroup. SIGTERM powers the guest off and undoes every step.
    """
    log.configure(log_format, log_level)  # type: ignore[arg-type]
    opts = Options(
        spec_path=spec_path,
        cgroup_root=cgroup_root,
        cgroup_mount=cgroup_mount,
        kubelet_dir=kubelet_dir,
        run_dir=run_dir,
        shutdown_timeout=shutdown_timeout,
        qmp_timeout=qmp_timeout,
        allow_spare_cpus=allow_spare_cpus,
        controller_socket=controller_socket,
        controller_timeout=controller_timeout,
        pause_before=pause_before,
    )
    sys.exit(trio.run(Supervisor(opts).run))


@cli.command()
@click.option(
    "--socket",
    "socket_path",
    default="/run/instance-runner/controller.sock",
    envvar=env("CONTROLLER_SOCKET"),
    show_envvar=True,
    metavar="PATH",
    help="Unix socket to serve JSON-RPC on (mode 0660).",
)
@click.option(
    "--cgroup-root",
    default="/sys/fs/cgroup/instances",
    envvar=env("CGROUP_ROOT"),
    show_envvar=True,
    help="Directory holding float/ and instance-<pod uid>/.",
)
@click.option(
    "--cgroup-mount",
    default="/sys/fs/cgroup",
    envvar=env("CGROUP_MOUNT"),
    show_envvar=True,
    help="Where the cgroup v2 hierarchy is mounted.",
)
@click.option(
    "--kubelet-dir",
    default="/var/lib/kubelet",
    envvar=env("KUBELET_DIR"),
    show_envvar=True,
    help="kubelet's state directory (cpu_manager_state).",
)
@click.option(
    "--idle-timeout",
    default=10.0,
    type=click.FloatRange(min=0.1),
    envvar=env("IDLE_TIMEOUT"),
    show_envvar=True,
    metavar="SECONDS",
    help="A connection that sends nothing for this long is closed.",
)
@click.option(
    "--resync-interval",
    default=10.0,
    type=click.FloatRange(min=0.1),
    envvar=env("RESYNC_INTERVAL"),
    show_envvar=True,
    metavar="SECONDS",
    help="Reconcile at least this often, whatever the events.",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default="json",
    envvar=env("LOG_FORMAT"),
    show_envvar=True,
    help="Logs on stderr.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    envvar=env("LOG_LEVEL"),
    show_envvar=True,
)
def controller(
    socket_path: str,
    cgroup_root: str,
    cgroup_mount: str,
    kubelet_dir: str,
    idle_timeout: float,
    resync_interval: float,
    log_format: str,
    log_level: str,
) -> None:
    """Run the node's instance cgroup controller (a DaemonSet on every worker).

    Owns <root>/float and <root>/instance-<pod uid>. Runners register over JSON-RPC 2.0
    (registerCgroup, deregisterCgroup, listInstances, health), one request per line. float
    follows kubelet's defaultCpuSet; instance cgroups of pods that are gone are removed.
    """
    from runner.controller import Controller, ControllerOptions

    log.configure(log_format, log_level)  # type: ignore[arg-type]
    opts = ControllerOptions(
        socket=socket_path,
        cgroup_root=cgroup_root,
        cgroup_mount=cgroup_mount,
        kubelet_dir=kubelet_dir,
        idle_timeout=idle_timeout,
        resync_interval=resync_interval,
    )
    sys.exit(trio.run(Controller(opts).run))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        # One line, not click's three: containers' logs are read one line at a time.
        print(f"instance-runner: {e.format_message()} (see --help)", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:
        print(f"instance-runner: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
