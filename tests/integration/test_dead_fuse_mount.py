"""A FUSE mount whose daemon died (the agent killed with its node pod) answers every access
with ENOTCONN. kubelet then unpublishes and unstages it: path validation must take it for the
mount point it is, and unmounting must remove it, or the mount stays on the node for good."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.validation import check_path
from sharedsync.storage import mounts

pytestmark = pytest.mark.root


@pytest.fixture
def dead_fuse_mount(tmp_path: Path) -> Iterator[Path]:
    """A real FUSE mount at tmp_path/kubelet/staging whose connection is gone."""
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("needs root and /dev/fuse")
    target = tmp_path / "kubelet" / "staging"
    target.mkdir(parents=True)
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        subprocess.run(["mount", "-i", "-t", "fuse.sharedsync-test", "-o",
                        f"fd={fd},rootmode=40000,user_id=0,group_id=0", "sharedsync-test",
                        str(target)], check=True, pass_fds=(fd,))
    finally:
        os.close(fd)  # the "daemon" is gone: the kernel aborts the connection
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def test_a_dead_fuse_mount_is_validated_and_unmounted(dead_fuse_mount: Path) -> None:
    with pytest.raises(OSError, match="not connected") as dead:
        dead_fuse_mount.lstat()
    assert dead.value.errno == errno.ENOTCONN
    assert mounts.is_mounted(dead_fuse_mount)

    assert check_path(str(dead_fuse_mount), "staging_target_path",
                      [dead_fuse_mount.parent]) == dead_fuse_mount
    mounts.unmount(dead_fuse_mount)
    assert not mounts.is_mounted(dead_fuse_mount)
    assert dead_fuse_mount.is_dir()
