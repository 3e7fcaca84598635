"""The mount table, parsed: a file mounted on its own is told from one inside a mounted
directory."""

from __future__ import annotations

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
