"""Synchronous mode's data path: a pure-Python FUSE daemon with kernel passthrough.

See :mod:`replication_agent.fuse.daemon` for the durability semantics.
"""

from .daemon import FuseServer, NullHooks, SyncHooks

__all__ = ["FuseServer", "NullHooks", "SyncHooks"]
