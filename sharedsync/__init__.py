"""sharedsync: replicated shared persistent volumes for Kubernetes built from node-local disks.

The distribution holds four parts: ``sharedsync.core`` (pure logic, no I/O), ``sharedsync.storage``
(thin adapters over loop devices, mounts and btrfs), ``csi_driver`` (the CSI gRPC plugin) and the
operator and agent that arrive in later milestones. This module only carries the version so that
importing it stays free of side effects.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
