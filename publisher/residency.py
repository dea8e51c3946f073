"""Copies of one block on one tier held by several owners (vLLM's secondary offloading tiers).

vLLM 0.29+ tags offloading events with `ownership`: the secondary tier that made them
(None: the primary one). One block can sit on CPU for the primary tier and for, say,
"kvcr" at once, and each removes its copy on its own. The index keeps one presence bit
per (block, tier), so an owner's removal must reach it only when no other owner still
holds a copy there: `TierOwners` holds such removals back.

It remembers only what it must: the named owners of (block, tier) pairs some named owner
stored, and whether the primary tier holds them too. Everything else passes through as
it is. When in doubt it lets a removal through (the index then under-counts a copy, it
never claims one that is gone): after a bridge restart, an engine restart, a gap the
replay could not fill or an AllBlocksCleared, it starts empty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from kvcore.bus import AllBlocksCleared, BlockRemoved, BlockStored, Event, tier_index

__all__ = ["TierOwners"]

_PRIMARY: Final = ""  # the owner of events that name none


class TierOwners:
    """Holds back removals of copies another owner of the same tier still holds.

    `holds(engine_hash, tier)` answers whether the rank's published state has the block on
    that tier (the publisher's mirror), for the first named copy of a block: any copy there
    before it is the primary tier's.
    """

    def __init__(self, holds: Callable[[int, int], bool]) -> None:
        self._holds = holds
        # (engine hash, tier) -> owners holding a copy ("" = primary), for pairs a named
        # owner stored; a pair leaves when its last copy does.
        self._owners: dict[tuple[int, int], set[str]] = {}
        self.held_back = 0  # removals (blocks) not published: another owner holds a copy

    def __len__(self) -> int:
        return len(self._owners)

    def clear(self) -> None:
        self._owners.clear()

    def filter(self, events: Sequence[Event], owners: dict[int, str]) -> list[Event]:
        """`events` with the blocks of removals another owner still holds taken out."""
        if not owners and not self._owners:
            return list(events)
        out: list[Event] = []
        # (hash, tier) -> held after the events of this batch seen so far (the mirror
        # applies the batch only once it is published)
        batch: dict[tuple[int, int], bool] = {}
        for i, event in enumerate(events):
            owner = owners.get(i, _PRIMARY)
            if event.pool is not None:
                out.append(event)  # a shared pool's, not a copy of this worker's
            elif isinstance(event, AllBlocksCleared):
                self._owners.clear()
                batch.clear()
                out.append(event)
            elif isinstance(event, BlockStored):
                self._stored(event, owner, batch)
                out.append(event)
            else:
                kept = self._removed(event, owner, batch)
                if kept:
                    out.append(event if len(kept) == len(event.block_hashes)
                               else BlockRemoved(block_hashes=kept, medium=event.medium,
                                                    group=event.group))
        return out

    def _stored(self, event: BlockStored, owner: str, batch: dict[tuple[int, int], bool]) -> None:
        tier = tier_index(event.medium)
        tracked = self._owners
        for h in event.block_hashes:
            pair = (h, tier)
            held = tracked.get(pair)
            if held is None and owner != _PRIMARY:
                held = tracked[pair] = set()
                if batch.get(pair, self._holds(h, tier)):
                    held.add(_PRIMARY)  # a copy no named owner made: the primary tier's
            if held is not None:
                held.add(owner)
            batch[pair] = True

    def _removed(
        self, event: BlockRemoved, owner: str, batch: dict[tuple[int, int], bool]
    ) -> list[int]:
        tier = tier_index(event.medium)
        tracked = self._owners
        kept: list[int] = []
        for h in event.block_hashes:
            pair = (h, tier)
            held = tracked.get(pair)
            if held is not None:
                held.discard(owner)
                if held:
                    self.held_back += 1
                    continue
                del tracked[pair]
            batch[pair] = False
            kept.append(h)
        return kept
