"""CPU lists as the kernel and kubelet write them ("0-3,8,10-11"), parsed into plain sets.

The kernel also accepts strides (``0-7:2/4``: in each group of 4 CPUs of 0-7, the first 2);
kubelet's parser does not, but reading them costs nothing and avoids surprises with hand-written
cpusets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CpuSet = frozenset[int]

_PART = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")


class CpuListError(ValueError):
    """Text that is not a CPU list."""


def parse(text: str) -> CpuSet:
    """Parse a CPU list; surrounding whitespace and a trailing newline are ignored."""
    text = text.strip()
    if not text:
        return frozenset()
    cpus: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        m = _PART.match(part)
        if not m:
            raise CpuListError(f"invalid CPU list {text!r}: bad element {part!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise CpuListError(f"invalid CPU list {text!r}: range {part!r} runs backwards")
        if m.group(3) is not None:
            used, group = int(m.group(3)), int(m.group(4))
            if not 0 < used <= group:
                raise CpuListError(f"invalid CPU list {text!r}: stride {part!r}")
            cpus.update(c for c in range(lo, hi + 1) if (c - lo) % group < used)
        else:
            cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def format(cpus: Iterable[int]) -> str:
    """Format as the kernel does: ascending, ranges collapsed, no spaces; "" for none."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
