"""Detached processes that outlive the command that started them, found again by pid file.

``scripts/cluster up`` returns while the cluster keeps running, and ``down`` (another process,
maybe after a reboot of the shell) must find what ``up`` started. Each process gets a pid file
and a log file; a pid file is trusted only while that pid's command line still names the
cluster's state directory (every component here is started with a path under it), so a reused
pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STOP_GRACE = 10.0
#: Consecutive checks (0.25 s apart) that must find a process gone before a step fails on it.
GONE_CHECKS = 4


class StepError(RuntimeError):
    """A step of ``up`` failed: the message names the step and the log file to read."""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


#: How long :func:`alive` waits out a command line that reads empty (a process in an exec).
EXEC_SETTLE_SECONDS = 1.0


def alive(pid_file: Path, marker: Path) -> int | None:
    """The pid recorded in ``pid_file`` if that process runs and its command line names
    ``marker`` (the state directory); else None.

    A process in the middle of an exec has no command line for a moment (``/proc/PID/cmdline``
    reads empty): a node's init passes through ``ip netns exec`` and ``unshare`` to bash, and a
    check that landed in one of those moments once failed ``scripts/cluster up``. So an empty
    command line of a process that is not gone is read again, for up to a second.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    deadline = time.monotonic() + EXEC_SETTLE_SECONDS
    while True:
        line = _cmdline(pid)
        if line or _gone(pid) or time.monotonic() > deadline:
            return pid if str(marker) in line else None
        time.sleep(0.005)


def spawn(argv: Sequence[str], *, pid_file: Path, log_file: Path,
          env: dict[str, str] | None = None) -> int:
    """Start ``argv`` in its own session, detached from this process, logging to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 env=env, close_fds=True)
    pid_file.write_text(f"{popen.pid}\n")
    _wait_for_exec(popen.pid)
    return popen.pid


def _wait_for_exec(pid: int, timeout: float = 10.0) -> None:
    """Until the child runs its own program: before its exec it still shows our command
    line, which :func:`alive` would take for a reused pid."""
    ours = os.path.realpath("/proc/self/exe")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.path.realpath(f"/proc/{pid}/exe") != ours:
                return
        except OSError:
            return  # gone already: the caller's checks report it
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie child of ours (``up`` started it and is still running) counts as gone
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def stop(pid_file: Path, marker: Path, grace: float = STOP_GRACE) -> bool:
    """SIGTERM the process group, then SIGKILL after ``grace``; True if something was running.
    (kube-apiserver can hang in shutdown for more than 30 s.)"""
    pid = alive(pid_file, marker)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while not _gone(pid):
                time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return pid is not None


def tail(log_file: Path, lines: int = 25) -> str:
    try:
        text = log_file.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {log_file})"
    return "\n".join(text)


def wait_for(what: str, ready: Callable[[], bool], *, timeout: float, log_file: Path,
             pid_file: Path | None = None, marker: Path | None = None) -> None:
    """Poll ``ready()``; a process that died meanwhile, or the deadline, fails the step with
    the log's last lines and its path."""
    deadline = time.monotonic() + timeout
    # the process is identified once (a pid file trusted by its command line), then followed
    # by pid: a command line read while the kernel swaps it in an exec can come back empty
    watched = pid_file is not None and marker is not None
    pid = alive(pid_file, marker) if pid_file is not None and marker is not None else None
    missing = 0
    while True:
        if ready():
            return
        if watched:
            if pid is None and pid_file is not None and marker is not None:
                pid = alive(pid_file, marker)
            missing = missing + 1 if pid is None or _gone(pid) else 0
            if missing >= GONE_CHECKS:
                raise StepError(f"{what}: the process exited; see {log_file}\n"
                                f"{tail(log_file)}")
        if time.monotonic() > deadline:
            raise StepError(f"{what}: not ready after {timeout:.0f}s; see {log_file}\n"
                            f"{tail(log_file)}")
        time.sleep(0.25)


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 120,
        input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command; a failure raises StepError with what it printed."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                check=False, input=input, cwd=cwd)
    except subprocess.TimeoutExpired as error:
        raise StepError(f"{' '.join(argv)}: timed out after {timeout:.0f}s") from error
    if check and result.returncode != 0:
        raise StepError(f"{' '.join(argv)} exited with {result.returncode}:\n"
                        f"{result.stderr.strip() or result.stdout.strip()}")
    return result


