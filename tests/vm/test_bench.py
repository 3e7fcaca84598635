"""scripts/bench-inside really measures: a short pin and cost run in the test VM gives rows
with the runner's and the baseline's figures side by side. Numbers are not judged here (that
is scripts/bench's job), only that both sides were measured and make sense."""

from __future__ import annotations

import json

import pytest

from .conftest import VMRunner


@pytest.mark.vm
@pytest.mark.slow
def test_bench_inside_measures_runner_and_baseline(testvm: VMRunner) -> None:
    inner = (
        ".venv/bin/python scripts/bench-inside pin --runs 1 1 2 && "
        ".venv/bin/python scripts/bench-inside cost --runs 1 --window 2"
    )
    r = testvm.run("--cpus", "4", "--timeout", "600", "--", "sh", "-c", inner, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    pin = [row for row in rows if row["bench"] == "pin"]
    assert sorted(row["vcpus"] for row in pin) == [1, 2]
    assert all(row["runner_ms"] > 0 and row["floor_ms"] > 0 for row in pin)
    cost = {row["who"]: row for row in rows if row["bench"] == "cost"}
    assert set(cost) == {"runner", "floor"}
    assert cost["runner"]["rss_kib"] > 10_000  # a Python process, not a misread field
    assert cost["runner"]["startup_ms"] > 0 and cost["floor"]["startup_ms"] > 0
    # Scraped: /metrics answered, and a scrape cost the runner some CPU.
    assert cost["runner"]["scrape_cpu_ms"] > 0 and cost["runner"]["scraped_wakeups_per_s"] > 0
    machines = [row for row in rows if row["bench"] == "machine"]
    assert machines and machines[0]["vm_cpus"] == 4
