from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# Property tests share the machine with test VMs (two workers, two cores): a per-example
# deadline would fail them on load, not on a bug.
settings.register_profile("shared-machine", deadline=None)
settings.load_profile("shared-machine")

# tests/vm/inside/ runs inside the test VM (root, pure cgroup v2); on the host it is driven
# by tests/vm/test_inside.py, never collected directly.
collect_ignore = [] if os.environ.get("TESTVM") else ["vm/inside"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the tests that boot a test VM and run a module inside it (in their
    listed order), then the other VM and end-to-end tests, then the quick ones. On two
    pytest-xdist workers (scripts/test) this keeps both cores busy until the end."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("vm") and "test_inside_vm" in item.name:
            return 0
        if item.get_closest_marker("vm") or item.get_closest_marker("e2e"):
            return 1
        return 2

    items.sort(key=rank)  # stable: the order within a rank is the collection order


@pytest.fixture(scope="session")
def vm_pod_capabilities() -> list[str]:
    """Exactly the capabilities deploy/example-vm.yaml gives the VM pod, which drops every
    other one; the tests that play an unprivileged VM pod give it these and no more."""
    manifest = Path(__file__).resolve().parents[1] / "deploy" / "example-vm.yaml"
    for doc in yaml.safe_load_all(manifest.read_text()):
        if doc and doc["kind"] == "Pod":
            (container,) = doc["spec"]["containers"]
            caps = container["securityContext"]["capabilities"]
            assert caps["drop"] == ["ALL"]
            return [c.lower() for c in caps["add"]]
    raise AssertionError(f"no Pod in {manifest}")
