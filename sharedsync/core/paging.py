"""Opaque page tokens for List* RPCs.

A token is the id of the last entry of the previous page; the next page starts strictly after it
in id order. That keeps pagination stable when entries are added or removed between pages (the
behaviour csi-sanity checks), and a token that is not an id of the listed kind is refused, which
the CSI spec maps to ABORTED.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

from .errors import Aborted, InvalidArgument

T = TypeVar("T")

#: Upper bound on one page, whatever the caller asks for, so that a response stays small.
MAX_PAGE_ENTRIES = 1000


def parse_token(token: str, is_valid_id: Callable[[str], bool]) -> str | None:
    """The id a page starts after, or None for the first page."""
    if not token:
        return None
    if not is_valid_id(token):
        raise Aborted(f"starting_token {token[:64]!r} is not a token this plugin issued")
    return token


def page_size(max_entries: int) -> int:
    """How many entries to return for a request's ``max_entries`` (0 means 'you choose')."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    return min(max_entries or MAX_PAGE_ENTRIES, MAX_PAGE_ENTRIES)


def next_token(page: Sequence[T], limit: int, key: Callable[[T], str]) -> str:
    """The token for the page after ``page``; empty when ``page`` was the last one.

    Stores fetch ``limit + 1`` entries so that a full page is known to have a successor.
    """
    return key(page[limit - 1]) if len(page) > limit else ""
