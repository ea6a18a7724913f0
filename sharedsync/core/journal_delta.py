"""Which byte ranges of a file an fsync must ship: the changes since the last record.

With FUSE passthrough the agent never sees writes, but btrfs tells where they went: every
write lands in a new file extent (copy-on-write), and each extent item records the transaction
(generation) that wrote it. So the extents of a file newer than the base snapshot's generation,
minus those already shipped in an earlier journal record of the same base, cover every byte
written since that record. An extent's identity is (file offset, length, generation, disk
address, offset into the disk extent): a rewrite of the same range always differs in generation
or disk address, because copy-on-write allocates the new extent while the old one is still
referenced, and a freed address that is reused belongs to a later transaction.

This over-approximates, never under: an extent split by a later partial overwrite shows up
again as new pieces, and those pieces are shipped again (same bytes, harmless).
"""

from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

#: btrfs file extent types (BTRFS_FILE_EXTENT_*).
INLINE, REGULAR, PREALLOC = 0, 1, 2


@dataclass(frozen=True, slots=True, order=True)
class FileExtent:
    """One EXTENT_DATA item of a file, as the extent tree holds it."""

    offset: int  # where in the file it starts
    length: int  # bytes of the file it covers
    generation: int  # the transaction that wrote it
    disk_bytenr: int = 0  # 0 for inline data (and holes in older filesystems)
    extent_offset: int = 0  # where in the disk extent this file range starts
    kind: int = REGULAR


def newer_extents(extents: Iterable[FileExtent], after_generation: int,
                  shipped: Set[FileExtent]) -> list[FileExtent]:
    """The extents written after ``after_generation`` that no earlier record shipped."""
    return [e for e in extents
            if e.generation > after_generation and e.length > 0 and e not in shipped]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` ranges with overlapping and touching ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def ranges_to_ship(extents: Sequence[FileExtent], size: int) -> list[tuple[int, int]]:
    """The file ranges covered by ``extents``, joined and cut at the file's ``size`` (an
    extent may reach past the end of the file: the tail block of a shrunk or unaligned file)."""
    return [(start, min(end, size))
            for start, end in merge_ranges((e.offset, e.offset + e.length) for e in extents)
            if start < size]
