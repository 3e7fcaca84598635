"""Command line of instance-runner; every option can also come from the environment
(INSTANCE_RUNNER_<OPTION>): containers are configured with env."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from runner import __version__, httpd
from runner.log import log
from runner.run.options import RUN_DIR_BASE, Options

F = TypeVar("F", bound=Callable[..., Any])


def _address(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            httpd.parse_address(value)
        except httpd.AddressError as e:
            raise click.BadParameter(str(e)) from None
    return value


def _bound(
    kind: type, suffixes: bool = False
) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """A limit given as a number (with K, M, G for bytes) or "max" (None: no limit)."""

    def parse(_ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None or value == "max":
            return None
        scale = 1
        text = value.strip()
        if suffixes and text[-1:].upper() in "KMG" and text[-1:]:
            scale = 1024 ** ("KMG".index(text[-1].upper()) + 1)
            text = text[:-1]
        try:
            number = kind(text) * scale
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number or 'max'") from None
        if number <= 0:
            raise click.BadParameter(f"{value!r} must be above 0, or 'max'")
        return number

    return parse


class StepChoice(click.Choice):  # type: ignore[type-arg]
    """The start-up step names, read from the step list only when needed: importing the runner
    costs the controller and every other command seconds in a slow VM."""

    def __init__(self) -> None:
        super().__init__([])

    @property
    def choices(self) -> tuple[str, ...]:
        from runner.run.steps import STEP_NAMES

        return tuple(STEP_NAMES)

    @choices.setter
    def choices(self, _value: object) -> None:
        pass


def option(*decls: str, env: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*decls, envvar=f"INSTANCE_RUNNER_{env}", show_envvar=True, **kw)


def seconds(name: str, default: float, help: str, minimum: float = 0.1) -> Callable[[F], F]:
    return option(
        f"--{name}",
        env=name.upper().replace("-", "_"),
        default=default,
        type=click.FloatRange(min=minimum),
        metavar="SECONDS",
        help=help,
    )


def node_options(f: F) -> F:
    """Where the node's cgroups and kubelet's state are: shared by runner and controller."""
    for decorator in reversed(
        [
            option(
                "--cgroup-root",
                env="CGROUP_ROOT",
                default="/sys/fs/cgroup/instances",
                help="Directory holding float/ and instance-<pod uid>/.",
            ),
            option(
                "--cgroup-mount",
                env="CGROUP_MOUNT",
                default="/sys/fs/cgroup",
                help="Where the cgroup v2 hierarchy is mounted.",
            ),
            option(
                "--partition",
                env="PARTITION",
                type=click.Choice(["none", "isolated"]),
                default="none",
                help="isolated: each instance's CPUs become an isolated cpuset partition, out "
                "of the scheduler's load balancing (kernel 6.7+; older kernels: one warning). "
                "In controller mode, the controller's decides.",
            ),
            option(
                "--kubelet-dir",
                env="KUBELET_DIR",
                default="/var/lib/kubelet",
                help="kubelet's state directory; float follows its cpu_manager_state.",
            ),
            option(
                "--log-format",
                env="LOG_FORMAT",
                type=click.Choice(["json", "text"]),
                default="json",
                help="Logs on stderr: JSON lines, or text for people.",
            ),
            option(
                "--log-level",
                env="LOG_LEVEL",
                default="info",
                type=click.Choice(["debug", "info", "warning", "error"]),
            ),
        ]
    ):
        f = decorator(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="instance-runner")
def cli() -> None:
    """Give each vCPU of a VM in a Kubernetes pod its own dedicated CPU.

    Runs as the pod's ENTRYPOINT (PID 1): vCPU threads go to a per-pod instance cgroup, one
    dedicated CPU each; everything else in the pod runs on the node's shared CPUs.
    """


@cli.command()
@option(
    "--spec", "spec_path", env="SPEC", required=True, metavar="FILE", help="Instance spec (JSON)."
)
@node_options
@option(
    "--run-dir",
    env="RUN_DIR",
    metavar="DIR",
    help="Where the readiness file 'ready' and the virtiofs sockets go, locked by this "
    f"runner [default: {RUN_DIR_BASE}/<pod uid>, or <name> with isolation off].",
)
@option(
    "--scratch-dir",
    env="SCRATCH_DIR",
    default="/var/tmp",
    show_default=True,
    metavar="DIR",
    help="Where the overlay of a disk with an 'image' lives while QEMU runs (unlinked as soon "
    "as QEMU opens it): mount an emptyDir here, on the node's disk rather than in RAM.",
)
@seconds(
    "shutdown-timeout",
    20.0,
    "How long the guest gets to power off before QEMU is told to quit. Stopping takes at "
    "most this + 4 s: keep the pod's grace period above that.",
    minimum=0,
)
@seconds("qmp-timeout", 30.0, "Deadline for QEMU to answer on QMP at start-up.")
@option(
    "--allow-spare-cpus",
    env="ALLOW_SPARE_CPUS",
    is_flag=True,
    help="Accept fewer vCPUs than dedicated CPUs.",
)
@option(
    "--isolation",
    env="ISOLATION",
    type=click.Choice(["on", "off"]),
    default="on",
    help="off: no cgroups and no pinning, with a warning (for trying the runner on a "
    "laptop; never in production).",
)
@option(
    "--dnsmasq",
    env="DNSMASQ",
    default="dnsmasq",
    metavar="PATH",
    help="dnsmasq binary, for nics in mode tap.",
)
@option(
    "--nft",
    env="NFT",
    default="nft",
    metavar="PATH",
    help="nftables' nft binary, for a nic with the masquerade binding.",
)
@option(
    "--ovmf-code",
    env="OVMF_CODE",
    default="/usr/share/OVMF/OVMF_CODE_4M.fd",
    show_default=True,
    metavar="FILE",
    help="UEFI firmware (OVMF) for a spec whose boot.firmware is uefi.",
)
@option(
    "--ovmf-vars",
    env="OVMF_VARS",
    default="/usr/share/OVMF/OVMF_VARS_4M.fd",
    show_default=True,
    metavar="FILE",
    help="OVMF's variable store template, copied per start (or once into boot.efi_vars).",
)
@option(
    "--passt",
    env="PASST",
    default="passt",
    metavar="PATH",
    help="passt binary, for a nic with the passt binding.",
)
@option(
    "--virtiofsd",
    env="VIRTIOFSD",
    metavar="PATH",
    help="virtiofsd binary, for shares [default: the Rust one if installed, else QEMU's].",
)
@option(
    "--controller-socket",
    env="CONTROLLER_SOCKET",
    metavar="PATH",
    help="Get the cgroups from the node controller at this socket (default: the runner "
    "makes them itself).",
)
@seconds("controller-timeout", 30.0, "How long to keep retrying the controller.")
@option(
    "--pod-uid",
    env="POD_UID",
    metavar="UID",
    help="The pod's UID (the Downward API's metadata.uid). Needed in controller mode when "
    "the container has a private cgroup namespace (it is not privileged): its cgroup path "
    "then does not name the pod.",
)
@seconds(
    "verify-interval",
    1.0,
    "How often, while the guest runs, each vCPU's cgroup and CPU are checked; one moved "
    "behind the runner's back is put back and logged. 0: never. Embedded mode: in "
    "controller mode the controller keeps the vCPUs, at its own --verify-interval.",
    minimum=0,
)
@option(
    "--metrics-address",
    env="METRICS_ADDRESS",
    metavar="HOST:PORT",
    callback=_address,
    help="Serve GET /metrics (Prometheus), /healthz (alive, monitors running) and /readyz "
    "(guest running, every vCPU placed) over HTTP here; values are read when asked "
    "[default: off].",
)
@option(
    "--pause-before",
    env="PAUSE_BEFORE",
    type=StepChoice(),
    hidden=True,
    help="Testing: wait before this start-up step.",
)
@option(
    "--bench-resume-early",
    "resume_early",
    env="BENCH_RESUME_EARLY",
    is_flag=True,
    hidden=True,
    help="Benchmark baseline: start the guest running and pin it only after QMP answers.",
)
def run(log_format: str, log_level: str, **kw: Any) -> None:
    """Start the instance and keep its vCPUs pinned until SIGTERM or the guest's end.

    QEMU starts paused; each vCPU thread moves to the instance cgroup and is pinned to one of
    the pod's dedicated CPUs before the guest runs. Everything else moves to the shared float
    cgroup. SIGTERM powers the guest off and undoes every step.
    """
    log.configure(log_format, log_level)  # type: ignore[arg-type]
    # Before trio opens its own: the fds a spec may name are the ones we were handed.
    inherited = frozenset(int(fd) for fd in os.listdir("/proc/self/fd")) - {0, 1, 2}
    import trio

    from runner.run.supervisor import Supervisor

    sys.exit(trio.run(Supervisor(Options(**kw, inherited_fds=inherited)).run))


@cli.command()
@option(
    "--socket",
    env="CONTROLLER_SOCKET",
    default="/run/instance-runner/controller.sock",
    metavar="PATH",
    help="Unix socket to serve JSON-RPC on (mode 0660).",
)
@node_options
@seconds("idle-timeout", 10.0, "A connection that sends nothing for this long is closed.")
@seconds("resync-interval", 10.0, "Reconcile at least this often, whatever the events.")
@seconds(
    "verify-interval",
    1.0,
    "How often the vCPUs it placed for a pod are checked and put back, and anything that "
    "joined the pod's container cgroup is moved to float. 0: never.",
    minimum=0,
)
@option(
    "--max-rt-priority",
    env="MAX_RT_PRIORITY",
    default=1,
    show_default=True,
    type=click.IntRange(1, 99),
    metavar="N",
    help="The highest SCHED_FIFO priority a pod's realtime vCPU may get (KubeVirt uses 1). "
    "Realtime is refused anyway while RT throttling is off (kernel.sched_rt_runtime_us -1).",
)
@option(
    "--pod-float-pids-max",
    env="POD_FLOAT_PIDS_MAX",
    default="1024",
    show_default=True,
    metavar="N|max",
    callback=_bound(int),
    help="Tasks (processes and threads) one pod may have in float: its pids.max there. A "
    "fork bomb exec'd into a pod stops here.",
)
@option(
    "--pod-float-cpus",
    env="POD_FLOAT_CPUS",
    default="1",
    show_default=True,
    metavar="CPUS|max",
    callback=_bound(float),
    help="CPU time one pod's helpers together may use in float (its cpu.max there), in CPUs: "
    "QEMU's main loop and I/O threads, virtiofsd, dnsmasq, anything exec'd into it. Raise it "
    "for I/O-heavy guests.",
)
@option(
    "--float-pids-max",
    env="FLOAT_PIDS_MAX",
    metavar="N|max",
    callback=_bound(int),
    help="Tasks every pod's part of float and the vCPUs may have together: pids.max on the "
    "cgroup root [default: max].",
)
@option(
    "--float-memory-max",
    env="FLOAT_MEMORY_MAX",
    metavar="BYTES|max",
    callback=_bound(int, suffixes=True),
    help="memory.max on the cgroup root (K, M, G allowed): what every process in float may "
    "allocate together once moved there. Memory cannot be bounded per pod in a threaded "
    "subtree; guest RAM preallocated before the move stays the pod's [default: max].",
)
@option(
    "--nft",
    env="NFT",
    default="nft",
    metavar="PATH",
    help="nftables' nft binary, for the masquerade and bandwidth rules the controller makes "
    "in a VM pod's network namespace.",
)
@option(
    "--health-address",
    env="HEALTH_ADDRESS",
    metavar="HOST:PORT",
    callback=_address,
    help="Serve GET /healthz (alive), /readyz (serving, float made) and /metrics "
    "(Prometheus) over HTTP here [default: off].",
)
def controller(log_format: str, log_level: str, **kw: Any) -> None:
    """Run the node's instance cgroup controller (a DaemonSet on every worker).

    Owns <root>/float and <root>/instance-<pod uid>. Runners register over JSON-RPC 2.0
    (registerCgroup, deregisterCgroup, moveProcess, placeVcpus, instanceStatus, makeNetwork,
    unmakeNetwork, listInstances, health), one request per line. float
    follows kubelet's defaultCpuSet; instance cgroups of pods that are gone are removed.
    """
    from runner.controller.server import Server
    from runner.controller.service import ControllerOptions

    log.configure(log_format, log_level)  # type: ignore[arg-type]
    import trio

    sys.exit(trio.run(Server(ControllerOptions(**kw)).run))


@cli.command()
@option(
    "--sysfs",
    env="SYSFS",
    default="/sys",
    metavar="DIR",
    help="Where sysfs is mounted.",
)
@option("--record", env="RECORD", is_flag=True, help="Print the raw sysfs snapshot instead.")
@option(
    "--cpus",
    "pod_cpus",
    env="CPUS",
    metavar="LIST",
    help="Also print the guest a pod holding these CPUs would get (with --spec).",
)
@option("--spec", "spec_path", env="SPEC", metavar="FILE", help="Instance spec (JSON), for --cpus.")
def topology(sysfs: str, record: bool, pod_cpus: str | None, spec_path: str | None) -> None:
    """Show the host as the planner sees it: CPUs by NUMA node and core, node distances, PCI
    devices with their node, IOMMU group and driver; with --cpus and --spec, the plan."""
    import json

    from runner import cpus, kube, plan, spec, topology

    try:
        snap = topology.record(sysfs)
        host = topology.parse(snap)
    except topology.TopologyError as e:
        raise click.ClickException(str(e)) from None
    if record:
        click.echo(json.dumps(snap, indent=1, sort_keys=True))
        return
    doc: dict[str, Any] = {
        "nodes": {
            n: {
                "cpus": cpus.format(host.cpus_of_node(n)),
                "cores": [
                    cpus.format(core)
                    for core in sorted(
                        {host.cpus[c].siblings for c in host.cpus_of_node(n)}, key=min
                    )
                ],
                "distances": list(host.distances.get(n, ())),
            }
            for n in sorted(host.nodes)
        },
        "smt": host.smt,
        "pci": {
            a: {"node": d.node, "iommu_group": d.iommu_group, "driver": d.driver}
            for a, d in host.devices.items()
            if d.iommu_group is not None or d.node is not None
        },
    }
    if pod_cpus is not None:
        if spec_path is None:
            raise click.UsageError("--cpus needs --spec")
        try:
            the_spec = spec.load(Path(spec_path).read_text(), source=spec_path)
            held = cpus.parse(pod_cpus)
            # A pod by name only: nothing is read from it.
            pod = kube.PodCgroup("/", "-", "-", "cgroupfs", "-", "guaranteed")
            the_plan = plan.make_plan(the_spec, pod, held, None, host)
        except OSError as e:
            raise click.ClickException(f"cannot read spec {spec_path}: {e.strerror}") from None
        except (spec.SpecError, cpus.CpuListError, plan.PlanError) as e:
            raise click.ClickException(str(e)) from None
        from runner.run.readiness import guest_topology

        doc["plan"] = {
            "vcpus": {i: c for i, c in enumerate(the_plan.placement)},
            **guest_topology(the_plan.layout),
        }
    click.echo(json.dumps(doc, indent=1))


@cli.command()
@option("--json", "as_json", env="JSON", is_flag=True, help="Print JSON for scripts.")
@option(
    "--pod",
    "pod_uid",
    env="POD",
    metavar="UID",
    help="On the node: show this pod's instance [default: every instance on the node, or "
    "inside a VM pod its own].",
)
@option(
    "--run-dir",
    env="RUN_DIR",
    metavar="DIR",
    help="The runner's run directory, whose 'ready' file names QEMU and each vCPU's thread "
    f"and CPU: inside the pod, which instance is ours [default: {RUN_DIR_BASE}/<pod uid>]; "
    "with --pod, where each vCPU's CPU is read.",
)
@option(
    "--cgroup-root",
    env="CGROUP_ROOT",
    default="/sys/fs/cgroup/instances",
    help="Directory holding float/ and instance-<pod uid>/.",
)
@option(
    "--cgroup-mount",
    env="CGROUP_MOUNT",
    default="/sys/fs/cgroup",
    help="Where the cgroup v2 hierarchy is mounted.",
)
def inspect(
    as_json: bool, pod_uid: str | None, run_dir: str | None, cgroup_root: str, cgroup_mount: str
) -> None:
    """Show every thread of a VM pod and check the pinning invariants.

    Inside a VM pod (kubectl exec) it shows its own instance; on the node, --pod UID shows
    that pod's, and no option every instance under --cgroup-root. Each thread with its role
    (vCPU n, QEMU main, IO thread, helper, runner, anchor), cgroup, allowed CPUs, the CPU it
    last ran on, that CPU's NUMA node and its run-queue delay. Marked with '!': a vCPU off
    its CPU or out of the instance cgroup, anything else on a dedicated CPU or in the
    instance cgroup, a process other than the anchor in the container cgroup. Exit status 0
    when every invariant holds, 1 when one is broken.
    """
    import json
    import signal

    from runner import kube, podview
    from runner.node import podscan
    from runner.node.cgroupfs import CgroupFS
    from runner.node.layout import Layout

    # A short-lived command: Ctrl-C and SIGTERM stop it at once (early.py only remembers them).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cg = CgroupFS(cgroup_mount)
    try:
        layout = Layout(cg, cg.relative(cgroup_root))
    except ValueError:
        raise click.UsageError(f"--cgroup-root {cgroup_root} is not below {cgroup_mount}") from None
    try:
        if pod_uid is not None:
            uid = kube.normalise_uid(pod_uid)
            if uid is None:
                raise click.UsageError(f"--pod {pod_uid!r} is not a pod UID")
            ready = Path(run_dir or f"{RUN_DIR_BASE}/{uid}") / "ready"
            pods = [podscan.on_node(layout, uid, ready)]
        else:
            own = Path(run_dir) if run_dir else podscan.own_run_dir(RUN_DIR_BASE)
            pods = [podscan.in_pod(own, cg)] if own else podscan.all_on_node(layout, RUN_DIR_BASE)
    except podscan.ScanError as e:
        raise click.ClickException(str(e)) from None
    reports = [podview.inspect(p) for p in pods]
    if as_json:
        click.echo(json.dumps(podview.document(reports), indent=1))
    else:
        click.echo(podview.tables(reports))
    sys.exit(0 if all(r.ok for r in reports) else 1)


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
