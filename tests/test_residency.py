"""Owners of one tier (vLLM's `ownership`): a removal by one owner reaches the index only when
no other owner of that tier still holds the block (publisher.residency.TierOwners)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.bus import TIERS, AllBlocksCleared, BlockRemoved, BlockStored, Event, pack_tokens
from publisher.mirror import BlockMirror
from publisher.residency import TierOwners

CPU, STORAGE = TIERS.index("cpu"), TIERS.index("storage")


def gpu_blocks(*hashes: int) -> BlockStored:
    """A GPU store with tokens (the mirror learns the blocks from it)."""
    return BlockStored(block_hashes=list(hashes), token_ids=pack_tokens(range(len(hashes) * 2)),
                       block_size=2)


def stored(*hashes: int, medium: str = "cpu") -> BlockStored:
    return BlockStored(block_hashes=list(hashes), medium=medium)


def removed(*hashes: int, medium: str = "cpu") -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes), medium=medium)


class Rank:
    """A bridge rank in miniature: the filter, then the mirror the rank publishes into."""

    def __init__(self) -> None:
        self.mirror = BlockMirror()
        self.owners = TierOwners(self.mirror.holds)
        self.mirror.apply([gpu_blocks(1, 2, 3)])

    def step(self, *events: tuple[Event, str | None]) -> list[Event]:
        """One engine batch: (event, ownership) pairs; returns what gets published."""
        owners = {i: owner for i, (_, owner) in enumerate(events) if owner is not None}
        out = self.owners.filter([event for event, _ in events], owners)
        self.mirror.apply(out)
        return out


class TestTierOwners:
    def test_without_owners_everything_passes(self) -> None:
        """No event names an owner: the events go through as they are."""
        rank = Rank()
        events = [stored(1), removed(1), AllBlocksCleared()]
        assert rank.owners.filter(events, {}) == events
        assert len(rank.owners) == 0

    def test_secondary_removal_while_primary_holds(self) -> None:
        """Primary and "kvcr" both hold block 1 on CPU: kvcr's removal is held back; the
        primary's, later, is published."""
        rank = Rank()
        rank.step((stored(1), None))
        assert rank.step((stored(1), "kvcr"), (removed(1), "kvcr")) == [stored(1)]
        assert rank.mirror.holds(1, CPU)
        assert rank.owners.held_back == 1
        assert rank.step((removed(1), None)) == [removed(1)]
        assert not rank.mirror.holds(1, CPU)
        assert len(rank.owners) == 0  # nothing left to remember

    def test_primary_removal_while_secondary_holds(self) -> None:
        """The secondary tier stored first; the primary's removal is held back."""
        rank = Rank()
        rank.step((stored(1), "kvcr"))
        rank.step((stored(1), None))
        assert rank.step((removed(1), None)) == []
        assert rank.mirror.holds(1, CPU)
        assert rank.step((removed(1), "kvcr")) == [removed(1)]
        assert not rank.mirror.holds(1, CPU)

    def test_primary_copy_stored_earlier_in_the_same_batch(self) -> None:
        """The mirror has not seen this batch yet: the batch's own stores count."""
        rank = Rank()
        out = rank.step((stored(1), None), (stored(1), "kvcr"), (removed(1), "kvcr"))
        assert out == [stored(1), stored(1)]
        assert rank.mirror.holds(1, CPU)

    def test_primary_copy_removed_earlier_in_the_same_batch(self) -> None:
        """A primary copy gone earlier in the batch is no longer there for the named one."""
        rank = Rank()
        rank.step((stored(1), None))
        out = rank.step((removed(1), None), (stored(1), "kvcr"), (removed(1), "kvcr"))
        assert out == [removed(1), stored(1), removed(1)]
        assert not rank.mirror.holds(1, CPU)

    def test_tiers_are_apart(self) -> None:
        """Owners on STORAGE do not hold a CPU copy."""
        rank = Rank()
        rank.step((stored(1), None), (stored(1, medium="storage"), "kvcr"))
        assert rank.step((removed(1), None)) == [removed(1)]
        assert rank.mirror.holds(1, STORAGE) and not rank.mirror.holds(1, CPU)

    def test_partly_held_removal(self) -> None:
        """A removal of several blocks keeps only those no other owner holds."""
        rank = Rank()
        rank.step((stored(1, 2, 3), None), (stored(2), "kvcr"))
        assert rank.step((removed(1, 2, 3), None)) == [removed(1, 3)]
        assert rank.mirror.holds(2, CPU)

    def test_untracked_named_removal_passes(self) -> None:
        """A removal by an owner whose store was never seen (a bridge restarted since) is
        published: the index may under-count, never keep a copy that is gone."""
        rank = Rank()
        rank.step((stored(1), None))
        assert rank.step((removed(1), "kvcr")) == [removed(1)]

    def test_cleared_forgets(self) -> None:
        """AllBlocksCleared (and `clear`, on engine restarts and unfilled gaps) starts over."""
        rank = Rank()
        rank.step((stored(1), None), (stored(1), "kvcr"))
        rank.step((AllBlocksCleared(), None))
        assert len(rank.owners) == 0
        rank.step((stored(2), None), (stored(2), "kvcr"))
        rank.owners.clear()
        assert rank.step((removed(2), "kvcr")) == [removed(2)]

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.lists(st.tuples(st.booleans(), st.sampled_from([1, 2, 3]),
                                       st.sampled_from(["cpu", "storage"]),
                                       st.sampled_from([None, "kvcr", "lmc"])),
                             min_size=1, max_size=6), max_size=12))
    def test_presence_is_any_owner_holding(
        self, batches: list[list[tuple[bool, int, str, str | None]]]
    ) -> None:
        """For any history of stores and removals by owners (each removing only a copy it
        holds), a block is on a tier after each batch exactly when some owner holds it."""
        rank = Rank()
        truth: set[tuple[int, str, str | None]] = set()
        for ops in batches:
            events: list[tuple[Event, str | None]] = []
            for store, h, medium, owner in ops:
                if store:
                    truth.add((h, medium, owner))
                    events.append((stored(h, medium=medium), owner))
                elif (h, medium, owner) in truth:
                    truth.discard((h, medium, owner))
                    events.append((removed(h, medium=medium), owner))
            rank.step(*events)
            for h in (1, 2, 3):
                for medium in ("cpu", "storage"):
                    held = any((h, medium, owner) in truth for owner in (None, "kvcr", "lmc"))
                    assert rank.mirror.holds(h, TIERS.index(medium)) is held, (h, medium)
