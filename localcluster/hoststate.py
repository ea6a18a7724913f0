"""What a cluster changes on the host, recorded by ``up`` so that ``down`` can put it back.

kubelet sets ``vm.overcommit_memory``, ``kernel.panic`` and ``kernel.panic_on_oops`` (global,
whatever namespace kubelet runs in); the mount points of the nodes' directories (/var/lib/kubelet,
/etc/cni, ...) must exist on the host for the bind mounts inside the nodes. The first ``up``
records the sysctls' values and which directories it created, in ``host-state.json``; later
``up``s keep that first record, and ``down`` restores it and removes the directories (if empty).
"""

from __future__ import annotations

import json
from pathlib import Path

from localcluster.layout import NODE_DIRS

#: Host-wide settings that kubelet and the CNI bridge plugin may change.
SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward")


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _record_path(state: Path) -> Path:
    return state / "host-state.json"


def record(state: Path) -> None:
    """Record the host's settings and create the missing mount points (first ``up`` only
    records; a later one only creates what is missing again)."""
    path = _record_path(state)
    if path.exists():
        saved = json.loads(path.read_text())
    else:
        saved = {"sysctls": {name: _sysctl_path(name).read_text().strip() for name in SYSCTLS},
                 "created_dirs": []}
    created: list[str] = saved["created_dirs"]
    for relative in NODE_DIRS:
        target = Path("/") / relative
        missing = [p for p in (target, *target.parents) if not p.exists()]
        for directory in reversed(missing):  # outermost first
            directory.mkdir()
            created.append(str(directory))
    state.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2) + "\n")


def restore(state: Path) -> list[str]:
    """Put the recorded settings back and remove the directories ``up`` made; what was done."""
    path = _record_path(state)
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    done = []
    for name, value in saved["sysctls"].items():
        current = _sysctl_path(name).read_text().strip()
        if current != value:
            _sysctl_path(name).write_text(value)
            done.append(f"sysctl {name} {current} -> {value}")
    for directory in reversed(saved["created_dirs"]):  # innermost first
        try:
            Path(directory).rmdir()
            done.append(f"removed {directory}")
        except FileNotFoundError:
            pass
        except OSError as error:  # something else wrote there: leave it, and say so
            done.append(f"left {directory}: {error.strerror}")
    path.unlink()
    return done
