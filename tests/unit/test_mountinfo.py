"""sharedsync.storage.mounts.parse_mountinfo: the kernel's mount table, as proc(5) writes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.storage.mounts import MountEntry, mount_table, mounts_at, parse_mountinfo

# The example of proc(5), with optional fields.
PROC5_EXAMPLE = (
    "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
)


def test_proc5_example() -> None:
    [entry] = parse_mountinfo(PROC5_EXAMPLE)
    assert entry == MountEntry(
        mount_id=36, major_minor="98:0", root="/mnt1", mount_point="/mnt2",
        options=frozenset({"rw", "noatime"}), fs_type="ext3", source="/dev/root",
        super_options=frozenset({"rw", "errors=continue"}),
    )
    assert not entry.read_only
    assert not entry.fs_read_only


@pytest.mark.parametrize(
    "optional",
    ["", " shared:1", " master:1", " shared:12 master:3", " shared:1 master:2 propagate_from:3",
     " unbindable"],
)
def test_optional_fields_before_separator(optional: str) -> None:
    line = f"120 29 0:45 / /var/lib/x rw,relatime{optional} - btrfs /dev/loop3 rw,ssd\n"
    [entry] = parse_mountinfo(line)
    assert entry.mount_point == "/var/lib/x"
    assert entry.options == {"rw", "relatime"}
    assert (entry.fs_type, entry.source) == ("btrfs", "/dev/loop3")
    assert entry.super_options == {"rw", "ssd"}


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        (r"/mnt/my\040disk", "/mnt/my disk"),
        (r"/mnt/tab\011here", "/mnt/tab\there"),
        (r"/mnt/new\012line", "/mnt/new\nline"),
        (r"/mnt/back\134slash", "/mnt/back\\slash"),
        (r"/mnt/back\134040", "/mnt/back\\040"),  # an escaped backslash followed by digits
        (r"/mnt/a\040-\040b", "/mnt/a - b"),  # looks like the separator once unescaped
        (r"/mnt/\040\040", "/mnt/  "),
        ("/mnt/caf\u00e9", "/mnt/caf\u00e9"),
    ],
)
def test_octal_escapes_in_paths(escaped: str, plain: str) -> None:
    line = f"50 1 0:1 {escaped} {escaped} rw shared:5 - tmpfs {escaped} rw,size=1k\n"
    [entry] = parse_mountinfo(line)
    assert entry.root == plain
    assert entry.mount_point == plain
    assert entry.source == plain
    assert entry.fs_type == "tmpfs"


def test_read_only_flags() -> None:
    text = (
        "1 0 0:1 / /a ro,relatime - ext4 /dev/sda1 rw\n"
        "2 0 0:2 / /b rw,relatime - btrfs /dev/loop0 ro,space_cache=v2\n"
        "3 0 0:3 / /c rw - btrfs /dev/loop1 rw\n"
    )
    a, b, c = parse_mountinfo(text)
    assert a.read_only
    assert not a.fs_read_only
    assert not b.read_only
    assert b.fs_read_only
    assert not c.read_only
    assert not c.fs_read_only


def test_empty_source_keeps_columns_in_place() -> None:
    # `mount -t tmpfs "" /x` shows an empty source: two spaces after the type.
    [entry] = parse_mountinfo("7 1 0:50 / /x rw - tmpfs  rw,size=4k\n")
    assert entry.fs_type == "tmpfs"
    assert entry.source == ""
    assert entry.super_options == {"rw", "size=4k"}


def test_blank_lines_and_missing_trailing_newline() -> None:
    text = "\n1 0 0:1 / / rw - ext4 /dev/vda rw\n\n2 1 0:2 / /proc rw - proc proc rw"
    entries = parse_mountinfo(text)
    assert [e.mount_point for e in entries] == ["/", "/proc"]
    assert parse_mountinfo("") == []


def test_unusual_characters_that_the_kernel_does_not_escape() -> None:
    # Only space, tab, newline and backslash are escaped; others arrive raw and must not be
    # mistaken for line breaks (str.splitlines would split on these).
    odd = "/mnt/a\x1cb\x1dc\x1ed\x85e\u2028f\x0bg\x0ch\rj"
    entries = parse_mountinfo(f"9 1 0:9 / {odd} rw - tmpfs none rw\n")
    assert [e.mount_point for e in entries] == [odd]


def test_order_is_kept_for_stacked_mounts() -> None:
    text = (
        "10 1 0:10 / /stack rw - tmpfs one rw\n"
        "11 10 0:11 / /stack ro - tmpfs two rw\n"
    )
    first, second = parse_mountinfo(text)
    assert (first.source, second.source) == ("one", "two")
    assert second.read_only


# -- round trip: render entries the way the kernel does, parse them back ------------------------


def _escape(value: str) -> str:
    out = []
    for ch in value:
        if ch in " \t\n\\":
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "".join(out)


_path_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\0")
_paths = st.text(_path_chars, min_size=0, max_size=20).map(lambda s: "/" + s)
_words = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                               exclude_characters="\\,"), min_size=1, max_size=8)
_options = st.frozensets(_words, min_size=1, max_size=4)
_optional = st.lists(st.sampled_from(["shared:1", "master:7", "propagate_from:2", "unbindable"]),
                     max_size=3)


@st.composite
def _entries(draw: st.DrawFn) -> tuple[MountEntry, list[str]]:
    entry = MountEntry(
        mount_id=draw(st.integers(min_value=1, max_value=1 << 20)),
        major_minor=f"{draw(st.integers(0, 255))}:{draw(st.integers(0, 1 << 16))}",
        root=draw(_paths),
        mount_point=draw(_paths),
        options=draw(_options),
        fs_type=draw(st.sampled_from(["ext4", "btrfs", "tmpfs", "fuse.sshfs", "overlay"])),
        source=draw(st.one_of(_paths, _words)),
        super_options=draw(_options),
    )
    return entry, draw(_optional)


def _render(entry: MountEntry, optional: list[str], parent: int) -> str:
    fields = [str(entry.mount_id), str(parent), entry.major_minor, _escape(entry.root),
              _escape(entry.mount_point), ",".join(sorted(entry.options)), *optional]
    return (" ".join(fields) + f" - {entry.fs_type} {_escape(entry.source)} "
            + ",".join(sorted(entry.super_options)))


@given(st.lists(_entries(), max_size=8))
def test_round_trip(entries: list[tuple[MountEntry, list[str]]]) -> None:
    text = "".join(_render(e, opt, 1) + "\n" for e, opt in entries)
    assert parse_mountinfo(text) == [e for e, _ in entries]


# -- the live table ------------------------------------------------------------------------------


def test_live_mount_table_parses() -> None:
    entries = mount_table()
    assert entries, "a process always has a root mount"
    assert any(e.mount_point == "/" for e in entries)
    assert all(e.mount_point.startswith("/") for e in entries)
    assert len(entries) == len(Path("/proc/self/mountinfo").read_bytes().splitlines())


def test_mounts_at_root_and_nothing(tmp_path: Path) -> None:
    assert mounts_at("/")
    assert mounts_at(tmp_path) == []
    assert mounts_at(os.path.join(str(tmp_path), "..", tmp_path.name)) == []
