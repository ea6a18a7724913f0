"""The CSI conformance suite (csi-sanity) against a real plugin with real mounts.

``scripts/csi-sanity`` starts the plugin, runs the suite, and fails on any leftover mount or
loop device; this test runs it, then reads the JUnit report so that a failure, an error, or a
skipped spec the README does not explain fails the build.
"""

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "build" / "csi-sanity.xml"
TOOLS_BIN = Path(os.environ.get("SHAREDSYNC_TOOLS_BIN",
                                Path.home() / ".cache" / "sharedsync" / "bin"))

pytestmark = [pytest.mark.conformance, pytest.mark.root]


def _sanity_available() -> None:
    if (TOOLS_BIN / "csi-sanity").exists():
        return
    reason = f"csi-sanity is not built in {TOOLS_BIN} (run scripts/build-tools)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must build it first")
    pytest.skip(reason)


def _spec_name(testcase: ET.Element) -> str:
    """A spec's name as the README lists it: without ginkgo's '[It] ' prefix."""
    return re.sub(r"^\[It\]\s*", "", testcase.get("name", ""))


def test_csi_sanity_passes_with_nothing_left_behind() -> None:
    _sanity_available()
    if os.geteuid() != 0:
        pytest.skip("csi-sanity needs root for real loop devices and mounts")
    assert shutil.which("mkfs.btrfs"), "btrfs-progs missing: run scripts/setup"
    REPORT.unlink(missing_ok=True)
    done = subprocess.run([str(REPO / "scripts" / "csi-sanity")], cwd=REPO,
                          capture_output=True, text=True, timeout=1800, check=False)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-60:])
    assert done.returncode == 0, f"csi-sanity failed (exit {done.returncode}):\n{tail}"

    suite = ET.parse(REPORT).getroot()
    cases = list(suite.iter("testcase"))
    failed = [_spec_name(c) for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = [_spec_name(c) for c in cases if c.find("skipped") is not None]
    passed = len(cases) - len(failed) - len(skipped)
    assert not failed, f"csi-sanity specs failed: {failed}"
    assert passed >= 77, f"only {passed} csi-sanity specs passed"

    readme = (REPO / "README.md").read_text()
    unexplained = [name for name in skipped if name not in readme]
    assert not unexplained, (
        "csi-sanity skipped specs that README.md does not list with a reason: "
        f"{unexplained}")
