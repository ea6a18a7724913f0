"""sharedsync.core.ids: name-derived ids are deterministic, distinct and path-safe."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.ids import (
    MAX_ID_BYTES,
    MAX_NAME_BYTES,
    SNAPSHOT_PREFIX,
    VOLUME_PREFIX,
    check_id,
    check_name,
    is_snapshot_id,
    is_volume_id,
    snapshot_id_for,
    volume_id_for,
)

names = st.text(min_size=1, max_size=200)
printable_names = st.text(
    st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn", "Zs")),
    min_size=1, max_size=64,
).filter(lambda n: len(n.encode()) <= MAX_NAME_BYTES)


# -- minted ids --------------------------------------------------------------------------------


def test_ids_known_shape() -> None:
    vol = volume_id_for("pvc-0b1c")
    snap = snapshot_id_for("snapshot-0b1c")
    assert vol.startswith(VOLUME_PREFIX)
    assert len(vol) == len(VOLUME_PREFIX) + 24
    assert snap.startswith(SNAPSHOT_PREFIX)
    assert len(snap) == len(SNAPSHOT_PREFIX) + 24
    # Stable across processes and releases: the id of an existing volume must never change.
    assert volume_id_for("pvc-0b1c") == vol
    assert volume_id_for("") != volume_id_for("\0")


@given(names)
def test_ids_are_deterministic_and_valid(name: str) -> None:
    vol, snap = volume_id_for(name), snapshot_id_for(name)
    assert vol == volume_id_for(name)
    assert snap == snapshot_id_for(name)
    assert check_id(vol, "volume_id") == vol
    assert check_id(snap, "snapshot_id") == snap
    assert is_volume_id(vol)
    assert not is_snapshot_id(vol)
    assert is_snapshot_id(snap)
    assert not is_volume_id(snap)
    for value in (vol, snap):
        assert "/" not in value
        assert "\0" not in value
        assert value not in (".", "..")
        assert value.isascii()
        assert len(value.encode()) <= MAX_ID_BYTES
    assert vol != snap


@given(st.lists(names, min_size=2, max_size=50, unique=True))
def test_ids_distinct_for_distinct_names(many: list[str]) -> None:
    assert len({volume_id_for(n) for n in many}) == len(many)
    assert len({snapshot_id_for(n) for n in many}) == len(many)


@given(names)
def test_volume_and_snapshot_digests_are_keyed_by_kind(name: str) -> None:
    assert volume_id_for(name)[len(VOLUME_PREFIX):] != snapshot_id_for(name)[len(SNAPSHOT_PREFIX):]


# -- check_id ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "0", "vol-0123", "A.b_c-d", "x" * MAX_ID_BYTES, "a..b", "abc.", volume_id_for("n")],
)
def test_check_id_accepts(value: str) -> None:
    assert check_id(value, "volume_id") == value


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dotdot"),
        pytest.param("../etc", id="parent-traversal"),
        pytest.param("a/b", id="slash"),
        pytest.param("/abs", id="absolute"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("-rf", id="leading-dash"),
        pytest.param("_x", id="leading-underscore"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param("a b", id="space"),
        pytest.param("a\0b", id="nul"),
        pytest.param("abc\n", id="trailing-newline"),
        pytest.param("abc\r", id="trailing-cr"),
        pytest.param("x" * (MAX_ID_BYTES + 1), id="129-bytes"),
        pytest.param("caf\u00e9", id="non-ascii-letter"),
        pytest.param("\u0661\u0662", id="non-ascii-digits"),
        pytest.param("\uff41", id="fullwidth-a"),
    ],
)
def test_check_id_rejects(value: str) -> None:
    with pytest.raises(InvalidArgument, match="volume_id"):
        check_id(value, "volume_id")


@given(st.text(max_size=300))
def test_check_id_property(value: str) -> None:
    ok = (
        0 < len(value.encode()) <= MAX_ID_BYTES
        and value.isascii()
        and all(c.isalnum() or c in "._-" for c in value)
        and value[0].isalnum()
    )
    if ok:
        assert check_id(value, "id") == value
    else:
        with pytest.raises(InvalidArgument):
            check_id(value, "id")
    if ok:
        assert "/" not in value
        assert value not in (".", "..")


@pytest.mark.parametrize(
    "value",
    [
        volume_id_for("x") + "\n",
        volume_id_for("x").upper(),
        volume_id_for("x")[:-1],
        volume_id_for("x") + "0",
        "vol-" + "g" * 24,
        " " + volume_id_for("x"),
        snapshot_id_for("x"),
        "",
    ],
)
def test_is_volume_id_rejects_near_misses(value: str) -> None:
    assert not is_volume_id(value)


@pytest.mark.parametrize(
    "value",
    [snapshot_id_for("x") + "\n", volume_id_for("x"), "snap-" + "0" * 23, "snap-" + "0" * 25],
)
def test_is_snapshot_id_rejects_near_misses(value: str) -> None:
    assert not is_snapshot_id(value)


@given(st.text(max_size=60))
def test_recognised_ids_always_pass_check_id(value: str) -> None:
    if is_volume_id(value) or is_snapshot_id(value):
        assert check_id(value, "id") == value


# -- check_name --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pvc-1", "a", "n" * MAX_NAME_BYTES, "caf\u00e9 au lait"])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name, "name") == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "required"),
        ("n" * (MAX_NAME_BYTES + 1), "longer"),
        ("\u00e9" * 65, "longer"),  # 130 bytes in UTF-8, 65 characters
        ("tab\there", "non-printable"),
        ("nl\n", "non-printable"),
    ],
)
def test_check_name_rejects(name: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        check_name(name, "name")


@given(printable_names)
def test_check_name_accepts_printable(name: str) -> None:
    assert check_name(name, "name") == name
