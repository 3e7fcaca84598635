"""The tests chosen to run on a second kernel series (tests/vm/test_inside.py) name tests that
exist: a renamed test must not silently drop out of the 6.1 run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.vm.test_inside import MODULES, SERIES_DEPENDENT

INSIDE = Path(__file__).resolve().parents[1] / "vm" / "inside"


def test_each_word_names_a_test_of_its_module() -> None:
    files = {name: module for name, module, *_ in MODULES}
    for (name, _kernel), (select, share) in SERIES_DEPENDENT.items():
        assert 0 < share < 1
        tests = [
            node.name
            for module in files[name].split()
            for node in ast.parse((INSIDE / module).read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        ]
        for word in re.findall(r"\w+", select):
            if word in ("or", "and", "not"):
                continue
            assert sum(word in t for t in tests) == 1, (name, word)
