"""The FUSE protocol layouts: sizes match the kernel's structs, and every layout round-trips."""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_agent.fuse import protocol as p

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
s32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
s64 = st.integers(-(2**63), 2**63 - 1)
nsec = st.integers(0, 999_999_999)
names = st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b and b"/" not in b)

# The sizes of the kernel's structs (include/uapi/linux/fuse.h, 7.45).
SIZES: dict[type[Any], int] = {
    p.InHeader: 40, p.OutHeader: 16, p.InitOut: 64, p.Attr: 88, p.OpenOut: 16,
    p.GetattrIn: 16, p.SetattrIn: 88, p.OpenIn: 8, p.CreateIn: 16, p.MknodIn: 16,
    p.MkdirIn: 8, p.RenameIn: 8, p.Rename2In: 16, p.LinkIn: 8, p.ReadIn: 40, p.WriteIn: 40,
    p.WriteOut: 8, p.ReleaseIn: 24, p.FlushIn: 24, p.FsyncIn: 16, p.ForgetIn: 8,
    p.BatchForgetIn: 8, p.ForgetOne: 16, p.InterruptIn: 8, p.KStatfs: 80, p.SetxattrIn: 8,
    p.GetxattrIn: 8, p.GetxattrOut: 8, p.AccessIn: 8, p.FallocateIn: 32, p.LseekIn: 24,
    p.LseekOut: 8, p.BackingMap: 16,
}

# Per-field value ranges (the struct format says which are signed and how wide).
_CODE_STRATEGY = {"I": u32, "i": s32, "Q": u64, "q": s64, "H": u16}


def _strategy_for(layout: type[Any]) -> st.SearchStrategy[Any]:
    codes = [c for c in layout.STRUCT.format.lstrip("<") if c.isalpha() and c != "x"]
    names_ = [f.name for f in fields(layout)]
    assert len(codes) == len(names_), layout
    return st.builds(layout, **{n: _CODE_STRATEGY[c] for n, c in zip(names_, codes, strict=True)})


@pytest.mark.parametrize("layout", list(SIZES), ids=lambda t: t.__name__)
def test_struct_sizes_match_the_kernel(layout: type[Any]) -> None:
    assert layout.STRUCT.size == SIZES[layout]


def test_composite_sizes() -> None:
    assert p.EntryOut.SIZE == 128  # FUSE_COMPAT_ENTRY_OUT_SIZE is 120; 7.9+ is 128
    assert p.AttrOut.SIZE == 104
    assert len(p.EntryOut(1, 2, 3, 4, 5, 6).pack()) == 128
    assert len(p.AttrOut(1, 2, p.EMPTY_ATTR).pack()) == 104
    assert p.InitIn.FULL_SIZE == 64
    assert p.DIRENT_HEAD_SIZE == 24  # FUSE_NAME_OFFSET


@pytest.mark.parametrize("layout", list(SIZES), ids=lambda t: t.__name__)
def test_every_fixed_layout_round_trips(layout: type[Any]) -> None:
    @given(_strategy_for(layout))
    def check(value: Any) -> None:
        packed = value.pack()
        assert len(packed) == layout.STRUCT.size
        assert layout.parse(packed) == value
        # at an offset inside a larger buffer, too
        assert layout.parse(b"\xff" * 8 + packed + b"\xee" * 3, 8) == value

    check()


def test_parse_of_a_short_buffer_fails() -> None:
    with pytest.raises(struct.error):
        p.WriteIn.parse(b"\0" * 39)


attrs = st.builds(p.Attr, ino=u64, size=u64, blocks=u64, atime=s64, mtime=s64, ctime=s64,
                  atimensec=nsec, mtimensec=nsec, ctimensec=nsec, mode=u32, nlink=u32, uid=u32,
                  gid=u32, rdev=u32, blksize=u32, flags=u32)
entries = st.builds(p.EntryOut, nodeid=u64, generation=u64, entry_valid=u64, attr_valid=u64,
                    entry_valid_nsec=nsec, attr_valid_nsec=nsec, attr=attrs)


@given(entries)
def test_entry_out_round_trips(entry: p.EntryOut) -> None:
    assert p.EntryOut.parse(entry.pack()) == entry


@given(u64, nsec, attrs)
def test_attr_out_round_trips(valid: int, valid_nsec: int, attr: p.Attr) -> None:
    out = p.AttrOut(valid, valid_nsec, attr)
    assert p.AttrOut.parse(out.pack()) == out


@given(u32, u32, u32, u32, u32)
def test_init_in_round_trips(major: int, minor: int, readahead: int, flags: int,
                             flags2: int) -> None:
    value = p.InitIn(major, minor, readahead, flags, flags2)
    packed = value.pack()
    assert len(packed) == 64
    assert p.InitIn.parse(packed) == value


def test_init_in_before_7_36_has_no_flags2() -> None:
    legacy = struct.pack("<IIII", 7, 31, 131072, p.FUSE_ASYNC_READ)
    parsed = p.InitIn.parse(legacy)
    assert (parsed.minor, parsed.flags2, parsed.capabilities) == (31, 0, p.FUSE_ASYNC_READ)


def test_capabilities_use_flags2_only_with_init_ext() -> None:
    with_ext = p.InitIn(7, 45, 0, p.FUSE_INIT_EXT | p.FUSE_ASYNC_READ, 0x20)
    assert with_ext.capabilities & p.FUSE_PASSTHROUGH
    without = p.InitIn(7, 45, 0, p.FUSE_ASYNC_READ, 0x20)
    assert not without.capabilities & p.FUSE_PASSTHROUGH


def test_passthrough_constants_match_the_upstream_header() -> None:
    assert p.FUSE_PASSTHROUGH == 1 << 37
    assert p.FUSE_PASSTHROUGH >> 32 == 0x20
    assert p.FUSE_INIT_EXT == 1 << 30
    assert p.FOPEN_PASSTHROUGH == 1 << 7

    def iow(magic: int, nr: int, size: int) -> int:  # _IOW on x86_64/arm64
        return (1 << 30) | (size << 16) | (magic << 8) | nr

    assert p.FUSE_DEV_IOC_BACKING_OPEN == iow(229, 1, p.BackingMap.STRUCT.size) == 0x4010E501
    assert p.FUSE_DEV_IOC_BACKING_CLOSE == iow(229, 2, 4) == 0x4004E502


def test_init_out_layout_puts_max_stack_depth_after_flags2() -> None:
    out = p.InitOut.with_capabilities(
        p.FUSE_ASYNC_READ | p.FUSE_PASSTHROUGH, major=7, minor=45, max_readahead=131072,
        max_background=64, congestion_threshold=48, max_write=1 << 20, time_gran=1,
        max_pages=256, map_alignment=0, max_stack_depth=1)
    raw = out.pack()
    assert len(raw) == 64
    flags, = struct.unpack_from("<I", raw, 12)
    max_pages, = struct.unpack_from("<H", raw, 28)
    flags2, max_stack_depth = struct.unpack_from("<II", raw, 32)
    assert flags & p.FUSE_INIT_EXT
    assert flags & p.FUSE_ASYNC_READ
    assert (max_pages, flags2, max_stack_depth) == (256, 0x20, 1)
    assert out.capabilities & p.FUSE_PASSTHROUGH
    assert raw[40:] == bytes(24)  # request_timeout 0, unused


@given(u64, st.integers(1, 2**31 - 1))
def test_open_out_carries_backing_id(fh: int, backing_id: int) -> None:
    raw = p.OpenOut(fh, p.FOPEN_PASSTHROUGH, backing_id).pack()
    assert struct.unpack("<QIi", raw) == (fh, p.FOPEN_PASSTHROUGH, backing_id)


@given(st.lists(st.tuples(u64, u64, st.integers(0, 15), names), max_size=40))
def test_dirents_are_8_byte_aligned_and_round_trip(items: list[tuple[int, int, int, bytes]]
                                                   ) -> None:
    dirents = [p.Dirent(ino, off, dtype, name) for ino, off, dtype, name in items]
    packed = [d.pack() for d in dirents]
    for record, d in zip(packed, dirents, strict=True):
        assert len(record) % 8 == 0
        assert len(record) == p.dirent_size(len(d.name)) >= 24 + len(d.name)
        assert len(record) - (24 + len(d.name)) < 8  # padding only
    assert p.parse_dirents(b"".join(packed)) == dirents


@given(st.lists(st.tuples(entries, u64, st.integers(0, 15), names), max_size=10))
def test_direntplus_round_trips(items: list[tuple[p.EntryOut, int, int, bytes]]) -> None:
    values = [p.DirentPlus(e, p.Dirent(ino, i + 1, t, n))
              for i, (e, ino, t, n) in enumerate(items)]
    packed = [v.pack() for v in values]
    for record, v in zip(packed, values, strict=True):
        assert len(record) == p.direntplus_size(len(v.dirent.name))
        assert len(record) % 8 == 0
    assert p.parse_direntplus(b"".join(packed)) == values


@given(st.lists(names, min_size=1, max_size=3), st.binary(max_size=16))
def test_names_round_trip(items: list[bytes], trailer: bytes) -> None:
    assert p.split_names(p.pack_names(*items) + trailer, len(items)) == items


def test_names_need_a_terminator() -> None:
    with pytest.raises(ValueError, match="NUL"):
        p.split_names(b"abc", 1)
    assert p.split_names(b"\0\0\0abc\0", 1, 3) == [b"abc"]


@given(st.lists(st.tuples(u64, u64), max_size=50))
def test_batch_forget_round_trips(pairs: list[tuple[int, int]]) -> None:
    items = [p.ForgetOne(n, c) for n, c in pairs]
    assert p.parse_batch_forget(p.pack_batch_forget(items)) == items


def test_batch_forget_ignores_a_count_beyond_the_body() -> None:
    body = p.BatchForgetIn(5).pack() + p.ForgetOne(7, 1).pack()
    assert p.parse_batch_forget(body) == [p.ForgetOne(7, 1)]


@given(st.integers(0, 2**12 - 1), st.integers(0, 2**20 - 1))
def test_device_numbers_round_trip(major: int, minor: int) -> None:
    dev = os.makedev(major, minor)
    encoded = p.encode_dev(dev)
    assert encoded < 2**32
    assert p.decode_dev(encoded) == dev


def test_device_encoding_matches_the_kernel() -> None:
    # new_encode_dev(MKDEV(8, 1)) == 0x801; a minor above 255 goes to bits 20+.
    assert p.encode_dev(os.makedev(8, 1)) == 0x801
    assert p.encode_dev(os.makedev(1, 0x1234)) == 0x34 | (1 << 8) | (0x12 << 20)


def test_attr_from_a_real_stat(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"x" * 10)
    target.chmod(0o640)
    os.utime(target, ns=(1_600_000_000_123_456_789, -1_000_000_001))
    real = os.stat(target)
    attr = p.Attr.from_stat(real)
    assert (attr.ino, attr.size, attr.mode, attr.nlink, attr.blocks, attr.blksize) == (
        real.st_ino, 10, stat.S_IFREG | 0o640, 1, real.st_blocks, real.st_blksize)
    assert (attr.atime, attr.atimensec) == (1_600_000_000, 123_456_789)
    assert (attr.mtime, attr.mtimensec) == (-2, 999_999_999)  # before 1970: floor division
    assert p.Attr.parse(attr.pack()) == attr


@given(st.floats(0, 10**6, allow_nan=False))
def test_split_timeout(seconds: float) -> None:
    whole, ns = p.split_timeout(seconds)
    assert 0 <= ns < 1_000_000_000
    assert abs(whole + ns / 1e9 - seconds) < 1e-6 * max(1.0, seconds)


def test_split_timeout_never_negative() -> None:
    assert p.split_timeout(-1) == (0, 0)


@given(st.integers(0, 2**64 - 1), st.integers(1, 4095), st.integers(0, 1 << 20))
def test_reply_header(unique: int, error: int, payload: int) -> None:
    ok = p.OutHeader.parse(p.reply_header(unique, 0, payload))
    assert ok == p.OutHeader(16 + payload, 0, unique)
    failed = p.OutHeader.parse(p.reply_header(unique, error, payload))
    assert failed == p.OutHeader(16, -error, unique)  # an error reply carries no payload


def test_mode_to_dtype() -> None:
    assert p.mode_to_dtype(stat.S_IFDIR | 0o755) == 4
    assert p.mode_to_dtype(stat.S_IFREG) == 8
    assert p.mode_to_dtype(stat.S_IFLNK) == 10
    assert p.mode_to_dtype(stat.S_IFIFO) == 1


def test_opcode_names() -> None:
    assert p.opcode_name(16) == "WRITE"
    assert p.opcode_name(9999) == "OP_9999"
    assert int(p.Opcode.RENAME2) == 45
    assert int(p.Opcode.LSEEK) == 46


def test_fsync_in_datasync_flag() -> None:
    assert p.FsyncIn(1, p.FUSE_FSYNC_FDATASYNC).datasync
    assert not p.FsyncIn(1, 0).datasync
