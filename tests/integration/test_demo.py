"""The README's first command must keep working: run the whole demo, as a user would."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo mounts real filesystems")
@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs is not installed")
def test_demo_runs_end_to_end_and_leaves_nothing(tmp_path: Path) -> None:
    sharedsync = Path(sys.executable).parent / "sharedsync"
    done = subprocess.run([str(sharedsync), "demo", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=540, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "left behind: nothing" in output
    assert "400 of 400 acknowledged records intact" in output
    assert "matches" in output  # the restored snapshot's checksum
