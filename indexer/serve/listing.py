"""ListWorkers pages: the order entries are listed in and the tokens that continue it.

Entries sort by (model, worker_id, dp_rank, kind); a page token names the last entry of
the page it follows and the filter it was asked with, so the next page starts right after
that entry however the listing changed in between (no offsets: an entry that stays
listed is never repeated or skipped) and a token is refused with another filter.

Listing a fleet costs the whole fleet's entries (the index has no order to start from),
so the pages after the first reuse the sorted listing their first page read while it is
younger than `REUSE_S`: paging a fleet costs about one listing, not one per page.
"""

from __future__ import annotations

import base64
import binascii
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, NamedTuple

import msgspec

from indexer.errors import InvalidQueryError
from indexer.index.protocol import WorkerInfo

__all__ = ["MAX_PAGE_SIZE", "REUSE_S", "ListingCache", "ListingPage", "ListingPosition",
           "listing_key", "page_of"]

MAX_PAGE_SIZE: Final = 10_000
REUSE_S: Final = 10.0
_KEPT_LISTINGS: Final = 4

ListingPosition = tuple[str, str, int, str]  # (model, worker_id, dp_rank, kind)


class _Token(msgspec.Struct, array_like=True, frozen=True):
    model: str
    role: str
    kind: str
    after: ListingPosition


class ListingPage(NamedTuple):
    entries: Sequence[WorkerInfo]
    next_page_token: str  # "" on the last page


def listing_key(info: WorkerInfo) -> ListingPosition:
    return (info.model, info.worker_id, info.dp_rank, info.kind)


def page_of(entries: Sequence[WorkerInfo], *, model: str, role: str, kind: str,
            page_size: int, page_token: str) -> ListingPage:
    """The page of `entries` (sorted by `listing_key`) the request asks for: from after
    `page_token`'s entry (the start when empty), `page_size` entries (capped at
    MAX_PAGE_SIZE; 0: all the rest, with no token)."""
    start = 0
    if page_token:
        after = _decode(page_token, model=model, role=role, kind=kind)
        start = bisect_right(entries, after, key=listing_key)
    if not page_size:
        return ListingPage(entries[start:], "")
    stop = start + min(page_size, MAX_PAGE_SIZE)
    page = entries[start:stop]
    if stop >= len(entries):
        return ListingPage(page, "")
    token = _Token(model, role, kind, listing_key(page[-1]))
    return ListingPage(page, base64.urlsafe_b64encode(msgspec.msgpack.encode(token)).decode())


def _decode(page_token: str, *, model: str, role: str, kind: str) -> ListingPosition:
    try:
        token = msgspec.msgpack.decode(
            base64.b64decode(page_token.encode(), altchars=b"-_", validate=True), type=_Token)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidQueryError("page_token: not a token this server gave") from None
    if (token.model, token.role, token.kind) != (model, role, kind):
        raise InvalidQueryError("page_token: it continues a listing with another model, role "
                                "or kind filter; ask its pages with the same filter")
    return token.after


Filter = tuple[str, str, str]  # (model, role, kind) as the request names them


class ListingCache:
    """The sorted listings of the last few filters, for the pages after a first one."""

    def __init__(self) -> None:
        self._kept: dict[Filter, tuple[float, list[WorkerInfo]]] = {}

    async def sorted_listing(self, key: Filter, continued: bool,
                             fetch: Callable[[], Awaitable[list[WorkerInfo]]]
                             ) -> list[WorkerInfo]:
        """`fetch()`'s entries sorted by `listing_key`; a continued listing (a page token)
        takes the one kept for `key` if it is younger than REUSE_S."""
        now = time.monotonic()
        kept = self._kept.get(key)
        if continued and kept is not None and now - kept[0] < REUSE_S:
            return kept[1]
        entries = sorted(await fetch(), key=listing_key)
        self._kept.pop(key, None)
        if len(self._kept) >= _KEPT_LISTINGS:
            del self._kept[next(iter(self._kept))]
        self._kept[key] = (now, entries)
        return entries
