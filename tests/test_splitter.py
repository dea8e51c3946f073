"""The splitter: event lists cut into batches under a byte limit, losing and inventing nothing.

Properties: the pieces, block by block, are the original events (each block with the same
parent, tokens, extra key, tier, adapter and salt, in the same order, removals and clears
in place); every batch built from a list encodes under the limit and passes the indexer's
validator; an event is cut only when it cannot fit a batch of its own.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.bus import (
    MAX_BLOCKS_PER_EVENT,
    MAX_EVENTS_PER_BATCH,
    MAX_POSITION,
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    encode_batch,
    pack_tokens,
    validate_batch,
)
from publisher.nats_sink import header_bytes
from publisher.splitter import envelope_bytes, event_bytes, split_events

U64 = 2**64 - 1
hashes = st.integers(0, U64)
media = st.sampled_from(["gpu", "cpu", "disk", "GPU", "cpu_pinned"])
names = st.none() | st.text(max_size=12)


@st.composite
def stored(draw: st.DrawFn) -> BlockStored:
    n = draw(st.integers(1, 40))
    block_hashes = draw(st.lists(hashes, min_size=n, max_size=n))
    if draw(st.booleans()):  # offloaded copy: known by hash only
        return BlockStored(block_hashes=block_hashes, medium=draw(media))
    block_size = draw(st.integers(1, 8))
    tokens = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n * block_size,
                           max_size=n * block_size))
    extra = draw(st.none() | st.lists(st.binary(max_size=24), min_size=n, max_size=n))
    return BlockStored(block_hashes=block_hashes, parent_hash=draw(st.none() | hashes),
                       token_ids=pack_tokens(tokens), block_size=block_size,
                       medium=draw(media), lora_name=draw(names), cache_salt=draw(names),
                       extra_keys=extra)


removed = st.builds(BlockRemoved, block_hashes=st.lists(hashes, min_size=1, max_size=40),
                    medium=media)
events_strategy = st.lists(st.one_of(stored(), removed, st.just(AllBlocksCleared())),
                           max_size=12)


def expand(events: list[Event]) -> list[tuple[Any, ...]]:
    """One record per block (and per clear): what the index applies, in order."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, AllBlocksCleared):
            out.append(("cleared",))
        elif isinstance(event, BlockRemoved):
            out.extend(("removed", h, event.medium) for h in event.block_hashes)
        else:
            width = event.block_size * 4 if event.token_ids else 0
            for k, h in enumerate(event.block_hashes):
                parent = event.parent_hash if k == 0 else event.block_hashes[k - 1]
                extra = None if event.extra_keys is None else event.extra_keys[k]
                out.append(("stored", h, parent, event.token_ids[k * width : (k + 1) * width],
                            event.block_size, event.medium, event.lora_name,
                            event.cache_salt, extra))
    return out


def largest_block(events: list[Event]) -> int:
    """Bytes the largest single-block piece of any event needs."""
    largest = 0
    for event in events:
        if isinstance(event, AllBlocksCleared):
            largest = max(largest, event_bytes(event))
        else:
            for k in range(len(event.block_hashes)):
                one: Event
                if isinstance(event, BlockRemoved):
                    one = BlockRemoved(block_hashes=[event.block_hashes[k]], medium=event.medium)
                else:
                    width = event.block_size * 4
                    one = msgspec.structs.replace(
                        event, block_hashes=[event.block_hashes[k]], parent_hash=U64,
                        token_ids=event.token_ids[k * width : (k + 1) * width],
                        extra_keys=None if event.extra_keys is None else [event.extra_keys[k]])
                largest = max(largest, event_bytes(one))
    return largest


def batch_of(events: list[Event], model: str, worker: str, dp_rank: int) -> EventBatch:
    return EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker, dp_rank=dp_rank,
                      epoch=time.time_ns(), seq=MAX_POSITION, ts=time.time(), events=events)


class TestSplitProperties:
    """Random event lists, limits and caps."""

    @settings(max_examples=400, deadline=None)
    @given(events=events_strategy, slack=st.integers(0, 4000),
           caps=st.tuples(st.sampled_from([1, 2, 5, MAX_EVENTS_PER_BATCH]),
                          st.sampled_from([1, 3, 10, MAX_BLOCKS_PER_EVENT])),
           rank=st.tuples(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
                          st.integers(0, 1000)))
    def test_pieces_rejoin_and_fit(self, events: list[Event], slack: int,
                                   caps: tuple[int, int], rank: tuple[str, str, int]) -> None:
        """Re-joined block by block the pieces are the events; each batch fits and validates."""
        max_events, max_blocks = caps
        model, worker, dp_rank = rank
        envelope = envelope_bytes(model, worker, dp_rank)
        limit = envelope + largest_block(events) + slack
        split = split_events(events, limit - envelope, max_events=max_events,
                             max_blocks=max_blocks)
        assert split.oversized == []
        assert expand([e for batch in split.batches for e in batch]) == expand(events)
        for events_of_batch in split.batches:
            assert 0 < len(events_of_batch) <= max_events
            batch = batch_of(events_of_batch, model, worker, dp_rank)
            validate_batch(batch)
            assert len(encode_batch(batch)) <= limit
            for event in events_of_batch:
                if not isinstance(event, AllBlocksCleared):
                    assert 0 < len(event.block_hashes) <= max_blocks
        budget = limit - envelope
        must_cut = sum(1 for e in events if event_bytes(e) > budget or (
            not isinstance(e, AllBlocksCleared) and len(e.block_hashes) > max_blocks))
        assert split.cut_events == must_cut  # an event that fits alone is kept whole

    @settings(max_examples=300, deadline=None)
    @given(event=st.one_of(stored(), removed, st.just(AllBlocksCleared())))
    def test_event_bytes_is_an_upper_bound(self, event: Event) -> None:
        """event_bytes never under-counts what msgpack writes."""
        assert len(msgspec.msgpack.encode(event)) <= event_bytes(event)


class TestFieldSizes:
    """The sizes the field sends: a 320k-token step, a 25,000-block resync."""

    def test_320k_token_step(self) -> None:
        """20,000 blocks of 16 tokens in one BlockStored (1.5 MB) against 1 MiB."""
        n, bs = 20_000, 16
        event = BlockStored(block_hashes=[(i * 0x9E3779B97F4A7C15) & U64 for i in range(1, n + 1)],
                            parent_hash=None, token_ids=pack_tokens(range(n * bs)), block_size=bs)
        limit = 1024 * 1024 - header_bytes("w|0|" + "9" * 20 + "|" + "9" * 20) - 64
        budget = limit - envelope_bytes("m", "w", 0)
        split = split_events([event], budget)
        assert len(split.batches) == 2 and split.cut_events == 1
        first, second = (batch[0] for batch in split.batches)
        assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
        assert first.parent_hash is None
        assert second.parent_hash == first.block_hashes[-1]  # the chain goes on
        assert first.block_hashes + second.block_hashes == event.block_hashes
        assert first.token_ids + second.token_ids == event.token_ids
        for batch in split.batches:
            assert len(encode_batch(batch_of(batch, "m", "w", 0))) <= limit

    def test_many_small_events_pack_by_bytes(self) -> None:
        """25,000 one-block events: batches by bytes, well under the event-count cap."""
        events: list[Event] = [AllBlocksCleared()]
        events += [BlockStored(block_hashes=[U64 - i], parent_hash=U64 - i - 1,
                               token_ids=pack_tokens(range(16)), block_size=16)
                   for i in range(25_000)]
        budget = 256 * 1024 - 512
        split = split_events(events, budget)
        assert split.cut_events == 0
        sizes = [len(encode_batch(batch_of(b, "m", "w", 0))) for b in split.batches]
        assert max(sizes) <= 256 * 1024
        assert min(sizes[:-1]) > 0.8 * 256 * 1024  # full batches, not one event each
        assert expand([e for b in split.batches for e in b]) == expand(events)


class TestOversized:
    """What fits no batch is handed back, in order; the rest still goes."""

    def test_block_larger_than_any_batch(self) -> None:
        """Block 1 of 3 has a huge extra key: blocks 0 and 2 are pieces, block 1 oversized."""
        tokens = pack_tokens(range(48))
        event = BlockStored(block_hashes=[10, 11, 12], parent_hash=9, token_ids=tokens,
                            block_size=16, extra_keys=[b"", b"x" * 5000, b""])
        split = split_events([event, BlockRemoved(block_hashes=[3])], 1000)
        assert [e.block_hashes for e in split.oversized] == [[11]]  # type: ignore[union-attr]
        pieces = [e for batch in split.batches for e in batch]
        assert isinstance(pieces[0], BlockStored) and pieces[0].block_hashes == [10]
        assert pieces[0].parent_hash == 9
        # block 12 still names 11 as its parent: the publisher drops it (unsendable chain)
        assert isinstance(pieces[1], BlockStored) and pieces[1].block_hashes == [12]
        assert pieces[1].parent_hash == 11 and pieces[1].token_ids == tokens[128:]
        assert isinstance(pieces[2], BlockRemoved)

    def test_nothing_fits(self) -> None:
        """A budget below any event: everything comes back as oversized, nothing is lost."""
        events: list[Event] = [AllBlocksCleared(), BlockRemoved(block_hashes=[1, 2])]
        split = split_events(events, 5)
        assert split.batches == []
        assert expand(split.oversized) == expand(events)  # type: ignore[arg-type]
