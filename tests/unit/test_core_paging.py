"""sharedsync.core.paging: tokens keep a listing stable while entries come and go."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedsync.core.errors import Aborted, InvalidArgument
from sharedsync.core.ids import is_snapshot_id, is_volume_id, snapshot_id_for, volume_id_for
from sharedsync.core.paging import MAX_PAGE_ENTRIES, next_token, page_size, parse_token

# -- parse_token -------------------------------------------------------------------------------


def test_parse_token_first_page() -> None:
    assert parse_token("", is_volume_id) is None


def test_parse_token_accepts_an_id_of_the_listed_kind() -> None:
    vol = volume_id_for("a")
    assert parse_token(vol, is_volume_id) == vol


@pytest.mark.parametrize(
    "token",
    ["garbage", "10", snapshot_id_for("a"), volume_id_for("a") + "\n", "../" + volume_id_for("a"),
     "x" * 10_000],
)
def test_parse_token_refuses_foreign_tokens(token: str) -> None:
    with pytest.raises(Aborted, match="starting_token") as info:
        parse_token(token, is_volume_id)
    assert len(str(info.value)) < 200  # a huge token is not echoed back in full


def test_parse_token_for_snapshots() -> None:
    snap = snapshot_id_for("s")
    assert parse_token(snap, is_snapshot_id) == snap
    with pytest.raises(Aborted):
        parse_token(volume_id_for("s"), is_snapshot_id)


# -- page_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "expected"),
    [(0, MAX_PAGE_ENTRIES), (1, 1), (7, 7), (MAX_PAGE_ENTRIES, MAX_PAGE_ENTRIES),
     (MAX_PAGE_ENTRIES + 1, MAX_PAGE_ENTRIES), (1 << 31, MAX_PAGE_ENTRIES)],
)
def test_page_size_table(asked: int, expected: int) -> None:
    assert page_size(asked) == expected


@pytest.mark.parametrize("asked", [-1, -(1 << 31)])
def test_page_size_refuses_negative(asked: int) -> None:
    with pytest.raises(InvalidArgument, match="max_entries"):
        page_size(asked)


@given(st.integers(min_value=0, max_value=1 << 40))
def test_page_size_bounds(asked: int) -> None:
    size = page_size(asked)
    assert 1 <= size <= MAX_PAGE_ENTRIES
    if 0 < asked <= MAX_PAGE_ENTRIES:
        assert size == asked


# -- next_token --------------------------------------------------------------------------------


def test_next_token_table() -> None:
    ids = ["a", "b", "c"]
    assert next_token(ids, 2, str) == "b"  # a successor was fetched: more to come
    assert next_token(ids[:2], 2, str) == ""  # exactly a full page and nothing after it
    assert next_token(ids[:1], 2, str) == ""
    assert next_token([], 2, str) == ""


# -- a whole listing, with the store changing between pages ------------------------------------


class FakeStore:
    """What a store does for List*: ids in order, the page after a token, limit + 1 fetched."""

    def __init__(self, ids: set[str]) -> None:
        self.ids = set(ids)

    def list(self, token: str, max_entries: int) -> tuple[list[str], str]:
        after = parse_token(token, is_volume_id)
        limit = page_size(max_entries)
        fetched = sorted(i for i in self.ids if after is None or i > after)[: limit + 1]
        return fetched[:limit], next_token(fetched, limit, lambda i: i)


_names = st.text(alphabet="abcdefghij", min_size=1, max_size=6)


@settings(max_examples=300)
@given(
    initial=st.sets(_names, max_size=40),
    max_entries=st.integers(min_value=0, max_value=7),
    data=st.data(),
)
def test_listing_with_concurrent_changes(initial: set[str], max_entries: int,
                                         data: st.DataObject) -> None:
    store = FakeStore({volume_id_for(n) for n in initial})
    ever_present = set(store.ids)  # will shrink to what existed throughout
    seen: list[str] = []
    token = ""
    for _ in range(1000):
        page, token = store.list(token, max_entries)
        assert len(page) <= page_size(max_entries)
        seen.extend(page)
        if not token:
            break
        # Between pages: other clients create and delete entries.
        for name in data.draw(st.lists(_names, max_size=3), label="inserted"):
            store.ids.add(volume_id_for(name))
        if store.ids:
            doomed = data.draw(st.lists(st.sampled_from(sorted(store.ids)), max_size=3),
                               label="deleted")
            store.ids.difference_update(doomed)
            ever_present.difference_update(doomed)
        ever_present &= store.ids
    else:
        pytest.fail("the listing never ended")
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert seen == sorted(seen)
    assert ever_present <= set(seen), "an entry present throughout was never returned"


@given(st.sets(_names, max_size=60), st.integers(min_value=1, max_value=9))
def test_listing_without_changes_returns_everything_once(initial: set[str], limit: int) -> None:
    store = FakeStore({volume_id_for(n) for n in initial})
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page, token = store.list(token, limit)
        pages += 1
        seen.extend(page)
        if not token:
            break
        assert len(page) == limit  # only a full page has a successor
    assert seen == sorted(store.ids)
    assert pages == max(1, -(-len(store.ids) // limit))
