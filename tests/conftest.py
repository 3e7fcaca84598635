from __future__ import annotations

import os

# tests/vm/inside/ runs inside the test VM (root, pure cgroup v2); on the host it is driven
# by tests/vm/test_inside.py, never collected directly.
collect_ignore = [] if os.environ.get("TESTVM") else ["vm/inside"]
