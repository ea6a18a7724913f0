"""localcluster.processes with real processes: a pid file is trusted while the pid's command
line names the cluster's state directory, and a process passing through execs (a node's init
goes ``ip netns exec`` -> ``unshare`` -> bash) stays recognised all along."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from localcluster.processes import alive

#: Runs itself again N times (an exec each time, the marker in every command line), then waits.
CHAIN = """n=$1
if [ "$n" -lt 300 ]; then exec bash "$0" $((n + 1)) "$2"; fi
read -t 1 < /dev/zero
true
"""


def test_a_process_passing_through_execs_is_alive_all_along(tmp_path: Path) -> None:
    """During an exec /proc/PID/cmdline reads empty for a moment: once, a check that landed
    there failed ``scripts/cluster up`` with "node-2 is not running"."""
    marker = tmp_path / "state"
    script = tmp_path / "chain.sh"
    script.write_text(CHAIN)
    proc = subprocess.Popen(["bash", str(script), "0", str(marker)])
    pid_file = tmp_path / "chain.pid"
    pid_file.write_text(f"{proc.pid}\n")
    checks = missed = 0
    while proc.poll() is None:
        checks += 1
        if alive(pid_file, marker) is None and proc.poll() is None:
            missed += 1
    assert checks > 50
    assert missed == 0, f"taken for gone {missed} times out of {checks} while it ran"


def test_a_dead_process_or_another_program_is_not_taken(tmp_path: Path) -> None:
    marker = tmp_path / "state"
    pid_file = tmp_path / "some.pid"
    assert alive(pid_file, marker) is None  # no pid file
    pid_file.write_text("not a pid\n")
    assert alive(pid_file, marker) is None
    pid_file.write_text(f"{os.getpid()}\n")  # runs, but names no marker: a reused pid
    assert alive(pid_file, marker) is None
    finished = subprocess.Popen(["sleep", "0"])
    finished.wait()
    pid_file.write_text(f"{finished.pid}\n")
    assert alive(pid_file, marker) is None
