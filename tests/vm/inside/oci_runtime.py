#!/usr/bin/env python3
"""An OCI runtime for podman in the tests: crun, except that a container whose config carries
the annotation `podsim.cgroup` is created in that cgroup.

podman names a container's cgroup `<parent>/libpod-<id>`, a name no kubelet runtime uses;
containerd and CRI-O put it where kubelet says (`/kubepods/pod<uid>/<id>`,
`…/cri-containerd-<id>.scope`). podsim prepares that cgroup and names it; this puts the
container there, so the runner sees the path a node would give it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ANNOTATION = "podsim.cgroup"


def bundle_of(args: list[str]) -> Path:
    for i, arg in enumerate(args):
        if arg in ("--bundle", "-b") and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--bundle="):
            return Path(arg.split("=", 1)[1])
    return Path.cwd()  # the OCI default: the bundle is the working directory


def main(args: list[str]) -> None:
    if "create" in args or "run" in args:
        config = bundle_of(args) / "config.json"
        spec = json.loads(config.read_text())
        path = spec.get("annotations", {}).get(ANNOTATION)
        if path:
            spec["linux"]["cgroupsPath"] = path
            config.write_text(json.dumps(spec))
    os.execvp("crun", ["crun", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
