"""Pure parts of scripts/testvm and scripts/podsim, tested without a VM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .scriptload import REPO, load

testvm = load("testvm")
podsim = load("podsim")


# --- podsim: kubelet cpu lists -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("", set()),
        ("0", {0}),
        ("0-3", {0, 1, 2, 3}),
        ("0-1,8,10-11\n", {0, 1, 8, 10, 11}),
        (" 2 , 4-5 ", {2, 4, 5}),
    ],
)
def test_podsim_parses_kubelet_cpu_lists(text: str, cpus: set[int]) -> None:
    assert podsim.parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "1,,2", "0-7:2/4"])
def test_podsim_rejects_bad_cpu_lists(text: str) -> None:
    with pytest.raises(podsim.Error):
        podsim.parse_cpus(text)


@given(st.sets(st.integers(min_value=0, max_value=511)))
def test_podsim_cpu_list_round_trip(cpus: set[int]) -> None:
    text = podsim.format_cpus(cpus)
    assert podsim.parse_cpus(text) == cpus
    assert " " not in text


def test_podsim_formats_like_kubelet() -> None:
    assert podsim.format_cpus({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"


def test_podsim_checksum_is_kubelets() -> None:
    # Value from a kubelet-written cpu_manager_state with this content and no entries.
    assert podsim.kubelet_checksum("static", "0-3", {}) == 611748604


def test_podsim_checksum_is_fnv32a() -> None:
    # Reference values of FNV-1a 32.
    assert podsim.fnv32a(b"") == 0x811C9DC5
    assert podsim.fnv32a(b"a") == 0xE40C292C


# --- testvm: options and QEMU's command line ---------------------------------------------------


def test_topology_parsing() -> None:
    t = testvm.parse_topology("sockets=2,cores=4,threads=2")
    assert (t.sockets, t.cores, t.threads, t.cpus) == (2, 4, 2, 16)
    assert testvm.parse_topology("cores=3").cpus == 3


def test_qemu_argv_for_a_numa_smt_layout(tmp_path: Path) -> None:
    cfg, cmd = testvm.parse_args(
        ["--topology", "sockets=2,cores=2,threads=2", "--memory", "1024", "--", "true"]
    )
    fds = {"console": 10, "stdout": 11, "stderr": 12, "control": 13}
    argv = testvm.qemu_argv(cfg, tmp_path, tmp_path / "job.sh", "tcg", fds)
    joined = " ".join(argv)
    assert "-smp 8,sockets=2,cores=2,threads=2" in joined
    assert "-cpu Cascadelake-Server" in joined  # SMT siblings need an Intel model under TCG
    assert "memory-backend-ram,id=m1,size=512M" in joined
    assert "cpu,node-id=1,socket-id=1" in joined
    assert "tcg,thread=multi" in joined
    assert cmd == ["true"]


def test_job_script_keeps_arguments_and_environment_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ODD", "it's $HOME `x`")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/session/only")
    monkeypatch.chdir(tmp_path)
    args = [
        "sh",
        "-c",
        'printf "%s|" "$@" "$ODD" "${SSH_AUTH_SOCK-unset}" "$PWD"',
        "sh",
        "a b",
        "it's",
        "$HOME",
        "",
        "*",
    ]
    job = testvm.write_job(tmp_path, args)
    out = subprocess.run(["env", "-i", "sh", str(job)], capture_output=True, text=True)
    # The command runs in the repository, wherever testvm was called from.
    assert out.stdout == f"a b|it's|$HOME||*|it's $HOME `x`|unset|{REPO}|"


def test_podsim_refuses_a_host_without_cgroup_v2(tmp_path: Path) -> None:
    # Any directory without cgroup.controllers stands for a v1 or hybrid host.
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/podsim"),
            "--cgroup-root",
            str(tmp_path),
            "run",
            "--uid",
            "0" * 32,
            "--cpus",
            "0",
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1
    assert "not a cgroup v2 hierarchy" in lines[0] or "must run as root" in lines[0]


# --- podsim: bad input is refused before the node is looked at ---------------------------------

INPUT_REFUSALS = [
    (["--cpus", "3-1"], "invalid CPU range"),
    (["--cpus", "1,1-2"], "names CPUs 1 twice"),
    (["--cpus", "one"], "invalid CPU list"),
    (["--qos", "burstable", "--cpus", "1"], "--cpus is only for Guaranteed pods"),
    ([], "--cpus is required for a Guaranteed pod"),
    (["--cpus", "1", "--container-id", "xyz"], "--container-id must be 64 lowercase hex"),
    (["--cpus", "1", "--uid", "../../etc"], "is not a pod UID"),
    (["--cpus", "1", "--bogus"], "unrecognized arguments: --bogus"),
    (["--cpus", "1", "--qos", "platinum"], "invalid choice"),
    (["--cpus", "1", "--container-name", "Side_Car"], "is not a container name"),
    (["--cpus", "1", "--container-name", "sidecar-"], "is not a container name"),
    (["--qos", "burstable", "--keep-entry"], "--keep-entry is only for Guaranteed pods"),
    (["--cpus", "1", "--"], "missing CMD"),
    (["--cpus", "1", "--oci", "--cgroupns", "private"], "are the runtime's to give with --oci"),
    (["--cpus", "1", "--oci", "--read-only-path", "/srv"], "are the runtime's to give with --oci"),
    (["--cpus", "1", "--cgroupns", "own"], "invalid choice"),
]


@pytest.mark.parametrize(("args", "message"), INPUT_REFUSALS)
def test_podsim_refuses_bad_input_in_one_line_touching_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    kubelet, cgroups = tmp_path / "kubelet", tmp_path / "cgroup"
    cgroups.mkdir()
    uid = [] if "--uid" in args else ["--uid", "0a1b2c3d-1111-2222-3333-444455556666"]
    cmd = [] if "--" in args else ["--", "sleep", "600"]
    node = ["--kubelet-dir", str(kubelet), "--cgroup-root", str(cgroups)]
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/podsim"), *node, "run", *uid, *args, *cmd],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode in (1, 2)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("podsim: ") and message in lines[0], r.stderr
    assert not kubelet.exists() and list(cgroups.iterdir()) == []
