"""Turning a CSI capacity range into the size we actually allocate.

A replica is a filesystem image, so its size has a floor (the smallest btrfs we make) and a
granularity (we round up to whole MiB so that loop devices and filesystems agree exactly).
"""

from dataclasses import dataclass

from .errors import OutOfRange

MiB = 1 << 20
GiB = 1 << 30

#: Smallest replica we create. btrfs in mixed mode would work from 16 MiB, but the kernel refuses to
#: resize a btrfs to less than 256 MiB (``btrfs_ioctl_resize`` returns EINVAL), so a smaller
#: replica could never be expanded, online or offline.
MIN_VOLUME_BYTES = 256 * MiB
#: What a request without a capacity range gets.
DEFAULT_VOLUME_BYTES = 1 * GiB
#: Below this size btrfs keeps data and metadata in shared ("mixed") block groups.
MIXED_MODE_BELOW_BYTES = 1 * GiB
#: Allocation unit: every size we hand out is a whole number of these.
ALIGNMENT_BYTES = MiB


@dataclass(frozen=True, slots=True)
class CapacityRange:
    """The caller's wish: at least ``required`` and at most ``limit`` bytes (0 = unset)."""

    required: int = 0
    limit: int = 0


def align_up(value: int, unit: int = ALIGNMENT_BYTES) -> int:
    """Round ``value`` up to a whole multiple of ``unit``."""
    return -(-value // unit) * unit


def align_down(value: int, unit: int = ALIGNMENT_BYTES) -> int:
    """Round ``value`` down to a whole multiple of ``unit``."""
    return (value // unit) * unit


def resolve_capacity(wish: CapacityRange, *, minimum: int = MIN_VOLUME_BYTES,
                     default: int = DEFAULT_VOLUME_BYTES) -> int:
    """Pick the size to allocate for ``wish``, or explain why none fits.

    The result is the smallest aligned size that is at least ``required`` and at least
    ``minimum``. When nothing is required it is ``default`` instead, brought down to the largest
    aligned size within ``limit`` if there is one (but never below ``minimum``). ``OutOfRange``
    is raised exactly when no aligned size lies between the lower bounds and ``limit``, as the
    CSI spec asks.
    """
    if wish.required < 0 or wish.limit < 0:
        raise OutOfRange("capacity_range bytes must not be negative")
    if wish.limit and wish.required > wish.limit:
        raise OutOfRange(
            f"capacity_range.required_bytes ({wish.required}) exceeds limit_bytes ({wish.limit})"
        )
    smallest = align_up(max(wish.required, minimum))
    if wish.required:
        size = smallest
    else:
        size = align_up(max(default, minimum))
        if wish.limit:
            size = max(smallest, min(size, align_down(wish.limit)))
    if wish.limit and size > wish.limit:
        raise OutOfRange(
            f"the smallest volume we can provide is {size} bytes "
            f"(minimum {minimum}, {ALIGNMENT_BYTES}-byte alignment), "
            f"above capacity_range.limit_bytes ({wish.limit})"
        )
    return size


def fits(size: int, wish: CapacityRange) -> bool:
    """Whether an existing volume of ``size`` bytes satisfies ``wish`` (idempotent create)."""
    if wish.required and size < wish.required:
        return False
    return not (wish.limit and size > wish.limit)


def resolve_expansion(current: int, wish: CapacityRange) -> int:
    """The new size for an expansion request; never shrinks."""
    if wish.limit < 0:
        raise OutOfRange("capacity_range bytes must not be negative")
    if wish.required <= 0:
        raise OutOfRange("capacity_range.required_bytes must be set to expand a volume")
    if wish.limit and wish.required > wish.limit:
        raise OutOfRange(
            f"capacity_range.required_bytes ({wish.required}) exceeds limit_bytes ({wish.limit})"
        )
    if wish.required <= current:
        return current
    size = align_up(wish.required)
    if wish.limit and size > wish.limit:
        raise OutOfRange(
            f"expanding to {wish.required} bytes needs {size} bytes ({ALIGNMENT_BYTES}-byte "
            f"alignment), above capacity_range.limit_bytes ({wish.limit})"
        )
    return size
