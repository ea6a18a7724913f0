"""Harness for running a cluster of processes on one machine, with real TCP and faults.

* :mod:`tests.cluster.netns` -- :class:`~tests.cluster.netns.TestNetwork`: network namespaces
  ("nodes") on a private bridge (10.77.0.0/24), processes run inside them, link cuts.
* :mod:`tests.cluster.faultproxy` -- a TCP proxy that injects latency, bandwidth caps,
  partitions and resets, in-process (:class:`~tests.cluster.faultproxy.FaultProxy`) or as a
  process (``python -m tests.cluster.faultproxy``) steered over a line-based control port
  (:class:`~tests.cluster.faultproxy.FaultProxyClient`).

This package is imported by the proxy process too, so it must stay free of heavy imports.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root (the working directory processes in nodes get by default).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The venv interpreter to run Python code in a node with (``[str(PYTHON), "-m", ...]``).
PYTHON = REPO_ROOT / ".venv" / "bin" / "python"

__all__ = ["PYTHON", "REPO_ROOT"]
