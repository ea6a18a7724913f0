"""What the local cluster may change on the host, captured before ``up`` and after ``down``.

``scripts/cluster down`` promises to put the host back: no process, mount, loop device,
namespace, link, route, cgroup, iptables rule, directory or sysctl change left behind. The
provider takes a :func:`snapshot` before ``up`` and compares one taken after ``down``
(:func:`differences`); anything new or gone is a failure naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from localcluster.hoststate import SYSCTLS
from localcluster.layout import NODE_DIRS, TOOLS_BIN, state_dir

Snapshot = dict[str, set[str]]
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60).stdout


def _cluster_processes() -> set[str]:
    """Command lines of processes that belong to a cluster: anything run from the tools bin
    or naming the cluster's state directory."""
    markers = (str(TOOLS_BIN), str(state_dir()))
    found: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue
        if any(marker in cmdline for marker in markers):
            found.add(cmdline)
    return found


def _mounts() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def _loop_devices() -> set[str]:
    out = _out(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"])
    return {f"{d['name']} {d.get('back-file')}" for d in json.loads(out or "{}").get(
        "loopdevices", [])}


def _cgroups() -> set[str]:
    found: set[str] = set()
    for hierarchy in CGROUP_ROOT.iterdir():
        if hierarchy.is_dir() and not hierarchy.is_symlink():
            found.update(f"{hierarchy.name}/{child.name}" for child in hierarchy.iterdir()
                         if child.is_dir())
    return found


def _iptables() -> set[str]:
    rules: set[str] = set()
    for tool in ("iptables-save", "ip6tables-save"):
        rules.update(f"{tool}: {line}" for line in _out([tool]).splitlines()
                     if line and not line.startswith(("#", ":")))
    return rules


def snapshot() -> Snapshot:
    return {
        "processes": _cluster_processes(),
        "mounts": _mounts(),
        "loop devices": _loop_devices(),
        "network namespaces": set(_out(["ip", "netns", "list"]).split()),
        "links": {line.split(": ")[1].split("@")[0]
                  for line in _out(["ip", "-o", "link", "show"]).splitlines() if ": " in line},
        "routes": set(_out(["ip", "route", "show"]).splitlines()),
        "cgroups": _cgroups(),
        "iptables rules": _iptables(),
        "directories": {f"/{d}" for d in NODE_DIRS if (Path("/") / d).exists()}
        | {p for p in ("/opt/containerd", "/run/containerd", "/var/lib/kube-proxy")
           if Path(p).exists()},
        "sysctls": {f"{name}={(Path('/proc/sys') / name.replace('.', '/')).read_text().strip()}"
                    for name in SYSCTLS},
    }


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """Every item present after and not before (left behind) or before and not after (taken)."""
    found = []
    for kind in before:
        for item in sorted(after[kind] - before[kind]):
            found.append(f"{kind}: left behind: {item}")
        for item in sorted(before[kind] - after[kind]):
            found.append(f"{kind}: gone: {item}")
    return found
