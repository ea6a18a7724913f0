"""Keep the agent's large buffers in the heap instead of a fresh mapping per allocation.

Every MiB the agent moves passes through a few short-lived buffers of about a MiB: a pipe read,
a frame's payload, a message gRPC hands over. glibc serves allocations above its mmap
threshold (128 KiB until it adapts, which it did not here) with a new mapping each time, so
every such buffer paid 256 page faults and the zeroing of fresh pages, then an munmap.
Measured here on 1 MiB frames: parsing a received PushMessage and reading its payload 0.84 ->
0.13 ms, building and serializing one 2.3 -> 0.44 ms. Raising the threshold above the largest
message (and the trim threshold with it, so the freed space stays for the next buffer) makes
them reuse freed heap memory instead; the cost is that the heap keeps up to
``TRIM_THRESHOLD_BYTES`` of freed space the agent may use again.
"""

import ctypes
import ctypes.util

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Above the largest message an agent sends or takes (peers.MAX_MESSAGE_BYTES, 8 MiB).
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Set the thresholds (glibc only); False where the C library has no ``mallopt``."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
