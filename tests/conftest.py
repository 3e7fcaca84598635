from __future__ import annotations

import os

import pytest
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
