"""The mount table (/proc/<pid>/mountinfo), parsed. Pure: the caller reads the file."""

from __future__ import annotations

import os
import re

_OCTAL = re.compile(r"\\([0-7]{3})")


def _options(mountinfo: str) -> dict[str, list[str]]:
    """Each mount point (field 5, with the kernel's octal escapes for space, tab, newline and
    backslash undone) and its mount options (field 6). Where mounts are stacked on one point,
    the last listed is the one seen."""
    options: dict[str, list[str]] = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 5:
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            options[point] = fields[5].split(",")
    return options


def mount_points(mountinfo: str) -> set[str]:
    """Every mount point in a mountinfo text."""
    return set(_options(mountinfo))


def is_file_mount(path: str, mountinfo: str) -> bool:
    """True if `path` itself is a mount point: a single file bind-mounted into a container.
    Such a mount keeps the inode it was made with, so a file the host later replaces (a
    socket a restarted daemon makes anew, a file renamed over) is never seen."""
    return os.path.normpath(path) in mount_points(mountinfo)


def writable_mounts(path: str, mountinfo: str) -> list[str]:
    """The mount points through which `path` can be written: the mount it is on, when that
    is read-write, and every read-write mount below it. `path` must be resolved (no
    symlinks)."""
    options = _options(mountinfo)
    path = os.path.normpath(path)
    holding = max(
        (p for p in options if path == p or path.startswith(p.rstrip("/") + "/")),
        key=len,
        default=None,
    )
    below = sorted(p for p in options if p.startswith(path.rstrip("/") + "/"))
    return [p for p in [holding, *below] if p is not None and "ro" not in options[p]]
