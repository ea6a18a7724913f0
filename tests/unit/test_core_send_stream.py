"""sharedsync.core.send_stream: a stream may create the one subvolume asked for, nothing else."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.send_stream import StreamRefused, SubvolumeGuard
from tests.send_streams import (
    MKFILE,
    PATH,
    SUBVOL,
    attribute,
    command,
    end,
    file_with,
    snapshot,
    stream,
    subvol,
)

NAME = "e00000001-s000000000002"


def check(data: bytes, expected: str = NAME, cuts: list[int] | None = None) -> SubvolumeGuard:
    """Feed ``data`` to a guard in pieces cut at ``cuts`` (one piece without them)."""
    guard = SubvolumeGuard(expected)
    edges = [0, *sorted(cuts or []), len(data)]
    for start, stop in itertools.pairwise(edges):
        guard.feed(data[start:stop])
    return guard


def test_a_full_stream_of_the_expected_subvolume_passes() -> None:
    guard = check(stream(subvol(NAME), file_with("dir/file", b"x" * 5000), end()))
    assert guard.created


def test_an_incremental_stream_of_the_expected_snapshot_passes() -> None:
    assert check(stream(snapshot(NAME), file_with("f", b"data"), end())).created


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_stream_version_is_read(version: int) -> None:
    assert check(stream(subvol(NAME), end(), version=version)).created


def test_nothing_is_decided_before_the_first_command_arrives() -> None:
    assert not check(stream()).created


@pytest.mark.parametrize("name", ["e00000009-s000000000001", "live", "", NAME + "x",
                                  "../" + NAME])
def test_another_subvolume_name_is_refused(name: str) -> None:
    with pytest.raises(StreamRefused, match="creates subvolume"):
        check(stream(subvol(name), end()))


def test_a_second_subvolume_is_refused() -> None:
    data = stream(subvol(NAME), file_with("f", b"1"),
                  subvol("e00000009-s000000000009"), file_with("g", b"2"), end())
    with pytest.raises(StreamRefused, match="second subvolume"):
        check(data)


def test_a_stream_that_does_not_start_by_creating_its_subvolume_is_refused() -> None:
    with pytest.raises(StreamRefused, match="starts with command"):
        check(stream(file_with("f", b"1"), end()))


def test_a_subvolume_command_without_a_path_is_refused() -> None:
    with pytest.raises(StreamRefused, match="creates subvolume None"):
        check(stream(command(SUBVOL), end()))
    with pytest.raises(StreamRefused, match="creates subvolume None"):
        check(stream(command(SUBVOL, attribute(PATH + 1, NAME.encode())), end()))


def test_an_oversized_subvolume_command_is_refused_before_it_is_buffered() -> None:
    header = struct.pack("<IHI", 1 << 30, SUBVOL, 0)
    with pytest.raises(StreamRefused, match="subvolume command"):
        check(stream() + header)


@pytest.mark.parametrize("head", [b"btrfs-strean\0" + struct.pack("<I", 1),
                                  b"btrfs-stream\0" + struct.pack("<I", 0),
                                  b"btrfs-stream\0" + struct.pack("<I", 4)])
def test_what_is_not_a_send_stream_is_refused(head: bytes) -> None:
    with pytest.raises(StreamRefused, match="not a btrfs send stream"):
        check(head + subvol(NAME))


def test_a_refusal_is_an_invalid_argument() -> None:
    from sharedsync.core.errors import InvalidArgument
    assert issubclass(StreamRefused, InvalidArgument)


VALID = stream(snapshot(NAME), file_with("a", b"1" * 300), command(MKFILE, attribute(PATH, b"b")),
               file_with("c", b"2" * 70), end())
INVALID = stream(subvol(NAME), file_with("a", b"1"), snapshot("e00000003-s000000000001"), end())


@given(st.lists(st.integers(min_value=0, max_value=len(VALID)), max_size=40))
def test_how_a_valid_stream_is_cut_changes_nothing(cuts: list[int]) -> None:
    assert check(VALID, cuts=cuts).created


@given(st.lists(st.integers(min_value=0, max_value=len(INVALID)), max_size=40))
def test_how_an_invalid_stream_is_cut_changes_nothing(cuts: list[int]) -> None:
    with pytest.raises(StreamRefused, match="second subvolume"):
        check(INVALID, cuts=cuts)


@given(st.binary(max_size=2000))
def test_any_bytes_after_a_valid_start_either_pass_or_are_refused(tail: bytes) -> None:
    """Garbage is ``btrfs receive``'s to reject (CRCs); the guard only never crashes on it."""
    with contextlib.suppress(StreamRefused):
        check(stream(subvol(NAME)) + tail)
