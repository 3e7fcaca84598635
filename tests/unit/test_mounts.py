"""The mount table, parsed: a file mounted on its own is told from one inside a mounted
directory."""

from __future__ import annotations

import pytest

from runner import mounts

MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
30 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
41 22 0:40 /run/instance-runner /run/instance-runner-node rw - tmpfs tmpfs rw
42 22 0:40 /run/other/controller.sock /run/sock/controller.sock rw - tmpfs tmpfs rw
43 22 0:41 / /mnt/with\\040space rw - tmpfs tmpfs rw
"""


def test_a_socket_mounted_as_a_file_is_a_mount_point() -> None:
    assert mounts.is_file_mount("/run/sock/controller.sock", MOUNTINFO)
    assert mounts.is_file_mount("/run/sock//controller.sock", MOUNTINFO)


def test_a_socket_inside_a_mounted_directory_is_not() -> None:
    assert not mounts.is_file_mount("/run/instance-runner-node/controller.sock", MOUNTINFO)


def test_escaped_mount_points_are_decoded() -> None:
    assert "/mnt/with space" in mounts.mount_points(MOUNTINFO)
    assert mounts.mount_points("") == set()


MOUNTS = """22 1 0:21 / / rw,relatime - ext4 /dev/sda rw
30 22 0:22 / /srv/data ro,relatime - ext4 /dev/sdb ro
31 30 0:23 / /srv/data/sub rw,relatime - tmpfs t rw
32 22 0:24 / /srv/other ro - tmpfs t rw
33 22 0:25 / /srv/stack rw - tmpfs t rw
34 33 0:26 / /srv/stack ro - tmpfs t rw
35 22 0:27 / /srv/with\\040space ro - tmpfs t rw
"""


@pytest.mark.parametrize(
    ("path", "writable"),
    [
        ("/srv/other", []),  # a volume mounted readOnly: served as it is
        ("/srv/other/deeper", []),
        ("/srv/data", ["/srv/data/sub"]),  # a writable volume below a read-only one
        ("/srv/data/sub", ["/srv/data/sub"]),
        ("/srv/datax", ["/"]),  # a name that only starts like a mount point
        ("/home", ["/"]),
        ("/srv/stack", []),  # the last mount on a point is the one seen
        ("/srv/with space", []),
    ],
)
def test_what_could_write_through_a_path(path: str, writable: list[str]) -> None:
    assert mounts.writable_mounts(path, MOUNTS) == writable
