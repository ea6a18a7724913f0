"""Thin adapters over the kernel's storage primitives: loop devices, mounts, btrfs.

Each module wraps one tool or one kernel interface, raises ``sharedsync.core.errors`` types, and
reads the kernel's own state (``/proc/self/mountinfo``, ``losetup -j``) instead of keeping a
shadow copy, so every operation can be retried after a crash and finds the truth.
"""
