"""The repository's shape promises: nothing shadows the standard library, entry points exist."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_operator_folder_does_not_shadow_the_stdlib_module() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    done = subprocess.run(
        [sys.executable, "-c", "import operator, kopf; print(operator.__file__)"],
        cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "/operator/" not in done.stdout.replace(str(REPO), "")
    assert not done.stdout.startswith(str(REPO))


def test_console_entry_points_answer_help() -> None:
    bindir = Path(sys.executable).parent
    for command in ("sharedsync", "sharedsync-csi"):
        done = subprocess.run([str(bindir / command), "--help"], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, f"{command} --help failed: {done.stderr}"
        assert "usage:" in done.stdout
