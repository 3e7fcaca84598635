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


def parse(text: str, bound: int | None = None) -> CpuSet:
    """Parse a CPU list; surrounding whitespace and a trailing newline are ignored.

    `bound`, for a list that someone else wrote (a request): every CPU must be below it (the
    node's possible CPUs), and the ranges together may not name more CPUs than that. Both are
    checked before anything is expanded, so the work is at most `bound` steps whatever the
    text says."""
    text = text.strip()
    if not text:
        return frozenset()
    quoted = _quote(text)
    parts: list[Iterable[int]] = []
    span = 0
    for raw in text.split(","):
        part = raw.strip()
        m = _PART.match(part)
        if not m:
            raise CpuListError(f"invalid CPU list {quoted}: bad element {_quote(part)}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise CpuListError(f"invalid CPU list {quoted}: range {_quote(part)} runs backwards")
        if bound is not None:
            if hi >= bound:
                raise CpuListError(
                    f"invalid CPU list {quoted}: CPU {_quote(str(hi))} is beyond this node's "
                    f"possible CPUs (0-{bound - 1})"
                )
            span += hi - lo + 1
            if span > bound:
                raise CpuListError(
                    f"invalid CPU list {quoted}: names more CPUs than this node has ({bound})"
                )
        if m.group(3) is not None:
            used, group = int(m.group(3)), int(m.group(4))
            if not 0 < used <= group:
                raise CpuListError(f"invalid CPU list {quoted}: stride {_quote(part)}")
            parts.append(c for c in range(lo, hi + 1) if (c - lo) % group < used)
        else:
            parts.append(iter(range(lo, hi + 1)))
    cpus: set[int] = set()
    for part_cpus in parts:
        cpus.update(part_cpus)
    return frozenset(cpus)


def _quote(text: str, limit: int = 40) -> str:
    """Text quoted in an error, cut short: it may be a caller's 64 KiB."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"


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
