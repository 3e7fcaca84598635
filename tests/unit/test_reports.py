"""The pure halves of scripts/bench and scripts/faults: summaries, tables and ratios from
canned measurements (the measuring itself runs in the test VM)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load(script: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(script, str(REPO / "scripts" / script))
    spec = importlib.util.spec_from_loader(script, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


bench = load("bench")
faults = load("faults")

ROWS = [
    *(
        {"bench": "pin", "vcpus": n, "run": r, "runner_ms": 10.0 * n + r, "floor_ms": 0.1 * n}
        for n in (1, 2)
        for r in range(5)
    ),
    *(
        {"bench": "unpinned", "mode": m, "run": r, "status_at_pin": s, "total_ms": v + r}
        for m, s, v in (("runner", "prelaunch", 0.5), ("baseline", "running", 300.0))
        for r in range(5)
    ),
    *(
        {
            "bench": "isolation",
            "mode": m,
            "run": r,
            "window_s": 10.0,
            "run_delay_ms": [d, d],
            "metric_delay_ms": [d, d],
            "involuntary": [i, i],
            "cpu_share": [c, c],
            "psi_some_pct": p,
            "dedicated_cpus": 3 if m == "kubevirt" else 2,
            "main_delay_ms": 10.0 * d,
        }
        for m, d, i, c, p in (
            ("isolated", 1.0, 5, 0.99, 0.1),
            ("no-sweep", 5000.0, 800, 0.4, 60.0),
            ("shared", 6000.0, 900, 0.33, 66.0),
            ("kubevirt", 3000.0, 400, 0.6, 40.0),
        )
        for r in range(5)
    ),
    *(
        {
            "bench": "cost",
            "who": w,
            "run": r,
            "window_s": 60,
            "rss_kib": k,
            "cpu_pct": c,
            "wakeups_per_s": s,
            "startup_ms": t,
            **(
                {
                    "scraped_cpu_pct": 0.6,
                    "scraped_wakeups_per_s": 3.2,
                    "scrape_cpu_ms": 4.0,
                    "quiet_cpu_pct": 0.5,
                    "quiet_wakeups_per_s": 1.6,
                }
                if w == "runner"
                else {}
            ),
        }
        for w, k, c, s, t in (("runner", 40960, 0.5, 3.0, 3000), ("floor", 20480, 0.01, 0.1, 2000))
        for r in range(5)
    ),
    *(
        {"bench": "stop", "mode": m, "run": r, "exit_code": 0, "ms": v + r}
        for m, v in (("runner", 800.0), ("qemu-alone", 400.0))
        for r in range(5)
    ),
]


def test_summary_medians_spreads_and_ratios() -> None:
    s = bench.summarise(ROWS)
    assert s["pin"][2]["runner_ms"] == {"median": 22.0, "min": 20.0, "max": 24.0, "n": 5}
    assert s["unpinned"]["runner"]["status_at_pin"] == ["prelaunch"]
    # Per second of window, per vCPU: 6000 ms in 10 s is 600 ms/s.
    assert s["isolation"]["shared"]["run_delay_ms_per_s"]["median"] == 600.0
    assert s["stop"]["qemu-alone"]["ms"]["median"] == 402.0
    text = bench.markdown(
        s,
        {"when": "now", "host_cpus": 2, "host_cpu_model": "cpu", "host_kernel": "k"},
        {b: f"cmd-{b}" for b in bench.BENCHES},
    )
    assert "| 2 | 22.0 (20.0-24.0) | 0.20 (0.20-0.20) | 110.0x |" in text
    # The layouts measured, in their order; one not measured (no partitions on the kernel)
    # has no column.
    assert (
        "| per vCPU | isolated | isolated, no sweep | KubeVirt's layout | shared "
        "| shared / isolated |" in text
    )
    assert (
        "| run-queue delay, ms per s | 0.10 (0.10-0.10) | 500.00 (500.00-500.00) "
        "| 300.00 (300.00-300.00) | 600.00 (600.00-600.00) | 6000.0x |" in text
    )
    assert (
        "| dedicated CPUs per VM (2 vCPUs) | 2 (2-2) | 2 (2-2) | 3 (3-3) | 2 (2-2) | 1.0x |" in text
    )
    assert "| QEMU main loop's run-queue delay, ms per s | 1.00 (1.00-1.00) |" in text
    assert "| runner / QEMU alone | 2.0x | |" in text
    assert "| the same from `instance_runner_vcpu_delay_seconds_total` | 0.10 (0.10-0.10) |" in text
    assert (
        "| wakeups per s, scraped every 15 s (runner) / not scraped (runner) | 3.20 (3.20-3.20) "
        "| 1.60 (1.60-1.60) | 2.0x |" in text
    )
    assert "| CPU per scrape of /metrics, ms | 4.00 (4.00-4.00) | | |" in text
    for b in bench.BENCHES:
        assert f"`cmd-{b}`" in text


def test_ratio_edges() -> None:
    assert bench.ratio(0, 0) == "1"
    assert bench.ratio(5, 0) == "∞"
    assert bench.ratio(1, 100) == "0.010x"


def test_fault_table_wraps_and_counts() -> None:
    rows = [
        {
            "fault": "SIGKILL of QEMU",
            "expected": "exit 137",
            "observed": "exit 137",
            "leftovers": [],
            "passed": True,
        },
        {
            "fault": "a fault with a long name " * 4,
            "expected": "nothing left",
            "observed": "exit 1",
            "leftovers": ["tap vm0", "socket run/qmp.sock"],
            "passed": False,
        },
    ]
    table = faults.table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["fault", "expected", "observed", "leftovers", "result"]
    assert "pass" in lines[2] and "FAIL" in table and "tap vm0," in table
    assert all(len(line) <= sum(w for _, w in faults.COLUMNS) + 2 * 4 for line in lines)
    md = faults.markdown(rows, "1 passed, 1 failed", "machine")
    assert md.splitlines()[-3] == "1 passed, 1 failed"
    assert "| SIGKILL of QEMU | exit 137 | exit 137 | none | pass |" in md


def test_a_skip_is_a_skip_with_its_reason() -> None:
    # Once counted as a failure: the isolated-partition scenario on 6.1, which has none.
    row = {
        "fault": "isolated partition",
        "expected": "vCPUs alone",
        "observed": "skipped: no isolated partitions before 6.7",
        "leftovers": [],
        "passed": False,
        "skipped": True,
    }
    assert faults.cells(row)[-1] == "skip" and "6.7" in faults.cells(row)[2]
    # Every module names its kernel and its test VM's CPUs.
    assert all(len(m) == 3 and m[2] >= 4 for m in faults.MODULES)
    assert ("test_tenants.py", "6.1", 6) in faults.MODULES
    assert ("test_tenants.py", "6.12", 6) in faults.MODULES
