"""Shared storage pools: pool writes through writers' batches, Score credit to mounting
workers, evictions and wipes by any writer, refusal of undeclared pools; at field scale
(pools of 50,000+ blocks). Memory backend (the Redis backend drops pool writes, counted)."""

from __future__ import annotations

import random

import msgspec

from indexer.index.memory import SyncMemoryIndex
from indexer.index.pools import POOL_RANK, refuse_undeclared
from indexer.index.protocol import ApplyOutcome, ScoreQuery, WorkerRef
from kvcore.bus import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    decode_batch,
    encode_batch,
    pack_tokens,
)
from kvcore.pools import KIND_POOL
from publisher.engines import decode_engine_payload
from publisher.mirror import BlockMirror

MODEL = "m"
BS = 16
POOL_BLOCKS = 50_000


class _Writer:
    """One worker rank's batches, seq by seq."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.seq = 0

    def batch(self, *events: Event) -> EventBatch:
        batch = EventBatch(schema=1, model=MODEL, worker_id=self.worker_id, epoch=1,
                           seq=self.seq, events=list(events))
        self.seq += 1
        return batch


def _tokens(n_blocks: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n_blocks * BS)]


def _hashes(n: int, base: int = 1_000_000) -> list[int]:
    return list(range(base, base + n))


def _gpu_store(hashes: list[int], tokens: list[int]) -> BlockStored:
    return BlockStored(block_hashes=hashes, token_ids=pack_tokens(tokens), block_size=BS)


def _query(tokens: list[int], mounts: dict[str, frozenset[str]] | None) -> ScoreQuery:
    return ScoreQuery(model=MODEL, token_ids=tokens, block_size=BS, mounts=mounts)


def _scores(index: SyncMemoryIndex, query: ScoreQuery) -> dict[str, tuple[int, dict[str, int]]]:
    return {s.worker_id: (s.matched_blocks, s.blocks_by_tier)
            for s in index.score(query).scores}


def _fleet() -> tuple[SyncMemoryIndex, list[int], list[int], dict[str, _Writer]]:
    """A holds the whole prompt on GPU and offloads it to pool P, then evicts all but the
    first 10 blocks from GPU; B holds the first 10 on GPU; C the first 5."""
    index = SyncMemoryIndex()
    tokens = _tokens(POOL_BLOCKS)
    hashes = _hashes(POOL_BLOCKS)
    writers = {w: _Writer(w) for w in "ABC"}
    outcomes = index.apply([
        writers["A"].batch(_gpu_store(hashes, tokens),
                           BlockStored(block_hashes=hashes, medium="storage", pool="P"),
                           BlockRemoved(block_hashes=hashes[10:])),
        writers["B"].batch(_gpu_store(hashes[:10], tokens[: 10 * BS])),
        writers["C"].batch(_gpu_store(hashes[:5], tokens[: 5 * BS])),
    ])
    assert all(o is ApplyOutcome.APPLIED for o in outcomes)
    return index, tokens, hashes, writers


MOUNTS = {"A": frozenset({"P"}), "B": frozenset({"P"})}


def test_mounting_workers_continue_their_prefix_through_the_pool() -> None:
    index, tokens, _, _ = _fleet()
    scores = _scores(index, _query(tokens, MOUNTS))
    assert scores["A"] == (POOL_BLOCKS, {"gpu": 10, "storage": POOL_BLOCKS - 10})
    assert scores["B"] == (POOL_BLOCKS, {"gpu": 10, "storage": POOL_BLOCKS - 10})
    assert scores["C"] == (5, {"gpu": 5})  # mounts nothing: no credit
    # Without mounts nobody is credited; the pool is never a candidate.
    plain = _scores(index, _query(tokens, None))
    assert plain == {"A": (10, {"gpu": 10}), "B": (10, {"gpu": 10}), "C": (5, {"gpu": 5})}
    assert "P" not in _scores(index, _query(tokens, {"P": frozenset({"P"})}))


def test_a_cold_worker_is_credited_only_through_its_mount() -> None:
    index, tokens, _, writers = _fleet()
    index.apply([_Writer("D").batch(AllBlocksCleared())])  # a rank with no blocks
    mounts = {**MOUNTS, "D": frozenset({"P"})}
    scores = _scores(index, _query(tokens, mounts))
    assert scores["D"] == (POOL_BLOCKS, {"storage": POOL_BLOCKS})
    assert "D" not in _scores(index, _query(tokens, MOUNTS))
    assert writers  # keeps the fleet's writers alive for the reader


def test_evictions_from_the_pool_by_any_writer_apply() -> None:
    index, tokens, hashes, writers = _fleet()
    # B never stored blocks 20.. itself: its eviction resolves through the pool's own map.
    index.apply([writers["B"].batch(
        BlockRemoved(block_hashes=hashes[20:], medium="storage", pool="P"))])
    scores = _scores(index, _query(tokens, MOUNTS))
    assert scores["A"] == (20, {"gpu": 10, "storage": 10})
    assert scores["B"] == (20, {"gpu": 10, "storage": 10})
    # A hole in the pool ends the credited prefix there.
    index.apply([writers["A"].batch(
        BlockRemoved(block_hashes=[hashes[12]], medium="storage", pool="P"))])
    assert _scores(index, _query(tokens, MOUNTS))["B"] == (12, {"gpu": 10, "storage": 2})
    assert index.stats().dropped.get("pool_unknown_block", 0) == 0


def test_a_wiped_pool_is_cleared_and_its_epoch_moves() -> None:
    index, tokens, _, writers = _fleet()
    before = next(w for w in index.workers(MODEL) if w.kind == KIND_POOL)
    assert before.blocks_by_tier == {"storage": POOL_BLOCKS}
    index.apply([writers["B"].batch(AllBlocksCleared(pool="P"))])
    assert _scores(index, _query(tokens, MOUNTS))["B"] == (10, {"gpu": 10})
    after = next(w for w in index.workers(MODEL) if w.kind == KIND_POOL)
    assert after.blocks_by_tier == {} and after.epoch == before.epoch + 1
    # A's own GPU blocks survive the pool's wipe.
    assert _scores(index, _query(tokens, None))["A"] == (10, {"gpu": 10})


def test_a_gone_pool_is_removed_with_its_blocks() -> None:
    index, tokens, _, _ = _fleet()
    assert index.remove_pool(MODEL, "P")
    assert not index.remove_pool(MODEL, "P")
    assert _scores(index, _query(tokens, MOUNTS))["B"] == (10, {"gpu": 10})
    assert all(w.kind != KIND_POOL for w in index.workers(MODEL))
    assert all(POOL_RANK not in {ref.dp_rank for ref in owners}
               for owners in index.presence(MODEL).values())


def test_pool_writes_follow_the_writers_sequence() -> None:
    index, tokens, hashes, writers = _fleet()
    evict = writers["B"].batch(BlockRemoved(block_hashes=hashes[30:], medium="storage",
                                            pool="P"))
    assert index.apply([evict]) == [ApplyOutcome.APPLIED]
    # A redelivered store by A (seq already applied) changes nothing.
    replay = EventBatch(schema=1, model=MODEL, worker_id="A", epoch=1, seq=0, events=[
        BlockStored(block_hashes=hashes, medium="storage", pool="P")])
    assert index.apply([replay]) == [ApplyOutcome.DUPLICATE]
    assert _scores(index, _query(tokens, MOUNTS))["B"] == (30, {"gpu": 10, "storage": 20})


def test_a_gap_in_a_writers_batches_wipes_the_pools_it_wrote() -> None:
    index, tokens, _, writers = _fleet()
    writers["A"].seq += 1  # one batch of A lost (it may have evicted from P)
    outcome = index.apply([writers["A"].batch()])
    assert outcome == [ApplyOutcome.APPLIED_AFTER_GAP]
    assert _scores(index, _query(tokens, MOUNTS))["B"] == (10, {"gpu": 10})


def test_presence_names_the_pool_as_its_own_owner() -> None:
    index, _, _, _ = _fleet()
    presence = index.presence(MODEL)
    holders = [owners for owners in presence.values() if WorkerRef("P", POOL_RANK) in owners]
    assert len(holders) == POOL_BLOCKS
    assert all(owners[WorkerRef("P", POOL_RANK)] == 0b0100 for owners in holders)


def test_undeclared_pool_writes_are_refused() -> None:
    batch = _Writer("A").batch(
        BlockStored(block_hashes=[1], medium="storage", pool="P"),
        BlockRemoved(block_hashes=[2], medium="storage", pool="P"),
        AllBlocksCleared(pool="Q"),
        BlockStored(block_hashes=[3]))
    kept, refused = refuse_undeclared(batch, ["P"])
    assert refused == 1 and [e.pool for e in kept.events] == ["P", "P", None]
    kept, refused = refuse_undeclared(batch, [])
    assert refused == 3 and [e.pool for e in kept.events] == [None]
    # A writer without a registry entry yet keeps only removals (they invent nothing).
    kept, refused = refuse_undeclared(batch, None)
    assert refused == 2
    assert [type(e).__name__ for e in kept.events] == ["BlockRemoved", "BlockStored"]


def test_todays_batches_decode_unchanged() -> None:
    batch = _Writer("A").batch(AllBlocksCleared(), BlockStored(block_hashes=[1]),
                               BlockRemoved(block_hashes=[1]))
    payload = encode_batch(batch)
    assert b"pool" not in payload
    assert decode_batch(payload) == batch
    pooled = _Writer("A").batch(AllBlocksCleared(pool="P"))
    assert decode_batch(encode_batch(pooled)).events[0].pool == "P"


def _engine_payload(*events: dict[str, object]) -> bytes:
    return msgspec.msgpack.encode([1.0, list(events), 0])


def test_the_bridge_turns_shared_tier_events_into_pool_writes() -> None:
    remote = {"type": "BlockStored", "block_hashes": [5, 6], "parent_block_hash": None,
              "token_ids": [], "block_size": 0, "medium": "STORAGE", "locality": "REMOTE"}
    owned = {"type": "BlockRemoved", "block_hashes": [5], "medium": "CPU", "ownership": "Q"}
    external = {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None,
                "token_ids": [], "block_size": 0, "medium": "EXTERNAL"}
    payload = _engine_payload(remote, owned, external)
    without = decode_engine_payload(payload)
    assert [s.split(":")[0] for s in without.skipped] == ["remote_block", "remote_block"]
    assert [e.pool for e in without.events] == [None]  # the CPU removal is the worker's own
    with_pools = decode_engine_payload(payload, pools=("P", "Q"))
    assert with_pools.skipped == []
    assert [(e.pool, e.medium) for e in with_pools.events] == [
        ("P", "storage"), ("Q", "storage"), ("P", "storage")]
    assert with_pools.owners == {}
    # The rank's mirror (its resync) holds only its own blocks, never a pool's.
    mirror = BlockMirror()
    mirror.apply(with_pools.events)
    assert len(mirror) == 0
